//! Constrained decoding: what a request constrains (a response format,
//! strict or forced tool calls) turned into one grammar, compiled by
//! llguidance against the model's vocabulary, and the per-sequence matcher
//! that gives each decode step its token mask.
//!
//! The grammar is Lark text with `%json` parts (llguidance's JSON-schema
//! compiler). Tool calls are spelled in the model family's own format: the
//! shim renders one call with the model's chat template and reports the text
//! around the name and the arguments ([`CallShape`]); special tokens in that
//! text become token references (`<[id]>`), so a marker that is one control
//! token is generated as that token.
//!
//! Compiling happens on a blocking worker (never on the engine thread), once
//! per distinct grammar ([`Grammars`] caches them); each request then gets a
//! cheap copy of the compiled matcher. Masks are computed on the engine
//! thread with the GIL released (see `engine/py/constraints.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llguidance::{api::TopLevelGrammar, Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

use crate::error::ApiError;
use crate::request::{ForceTool, GenerateRequest, ResponseFormat};

/// How one tool call is spelled in the model's format:
/// `head` + name + `mid` + arguments (JSON) + `tail`. `head` starts with
/// `start`, the marker that opens a call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallShape {
    pub start: String,
    pub head: String,
    pub mid: String,
    pub tail: String,
}

/// JSON as the grammar writes it: `{"a": 1, "b": [2, 3]}`, no other
/// whitespace. Free whitespace would let a model (a random one surely) pad
/// forever; this is the spacing models see most in tool calls.
fn json_options(lenient: bool) -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ", "lenient": lenient})
}

/// Whether a request needs a grammar.
pub fn wanted(req: &GenerateRequest) -> bool {
    req.format.is_some() || req.force_tool.is_some() || !req.strict_tools.is_empty()
}

/// Grammars for one model's vocabulary, compiled once each.
pub struct Grammars {
    factory: ParserFactory,
    n_vocab: usize,
    /// Special tokens' text and id, longest first (literal text is split
    /// around them).
    specials: Vec<(String, u32)>,
    shape: Option<CallShape>,
    eos: Arc<[u32]>,
    cache: Mutex<HashMap<String, (Arc<Compiled>, u64)>>,
    uses: std::sync::atomic::AtomicU64,
}

/// Compiled grammars kept (least recently used go first).
const CACHE_ENTRIES: usize = 128;

/// A compiled grammar: every request with it starts from a copy.
pub struct Compiled {
    proto: Mutex<Matcher>,
    n_vocab: usize,
    eos: Arc<[u32]>,
    /// How long compiling took (the first request with this grammar).
    pub compile_time: Duration,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Compiled {{ compile_time: {:?} }}", self.compile_time)
    }
}

impl Compiled {
    /// A fresh matcher for one sequence.
    pub fn matcher(&self) -> SeqMatcher {
        SeqMatcher {
            m: self.proto.lock().unwrap_or_else(|e| e.into_inner()).deep_clone(),
            n_vocab: self.n_vocab,
            eos: self.eos.clone(),
        }
    }
}

/// A request's compiled constraint (compared by identity).
#[derive(Debug, Clone)]
pub struct Constraint(pub Arc<Compiled>);

impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// One sequence's grammar state.
pub struct SeqMatcher {
    m: Matcher,
    n_vocab: usize,
    /// End-of-sequence tokens end the generation; the grammar never takes them.
    eos: Arc<[u32]>,
}

impl SeqMatcher {
    /// Consumes the tokens generated since the last call, then writes the
    /// next token's mask into `row` (1: allowed). Once the grammar is
    /// complete only end-of-sequence tokens are allowed.
    pub fn advance_and_mask(&mut self, tokens: &[u32], row: &mut [u8]) -> Result<(), String> {
        for t in tokens.iter().filter(|t| !self.eos.contains(t)) {
            self.m.consume_token(*t).map_err(|e| format!("constraint: {e}"))?;
        }
        let mask = self.m.compute_mask_or_eos().map_err(|e| format!("constraint: {e}"))?;
        if mask.is_zero() {
            // Sampling from an empty row would pick an arbitrary token.
            return Err("constraint: the grammar allows no next token".into());
        }
        let n = self.n_vocab.min(row.len());
        row[n..].fill(0);
        for (w, chunk) in mask.as_slice().iter().zip(row[..n].chunks_mut(32)) {
            if *w == 0 {
                chunk.fill(0);
            } else if *w == u32::MAX {
                chunk.fill(1);
            } else {
                for (b, out) in chunk.iter_mut().enumerate() {
                    *out = ((w >> b) & 1) as u8;
                }
            }
        }
        Ok(())
    }

    /// Whether the output so far is a complete match.
    pub fn is_accepting(&mut self) -> bool {
        self.m.is_accepting().unwrap_or(false)
    }
}

impl Grammars {
    /// The vocabulary of `tokenizer_json` (a Hugging Face tokenizer.json),
    /// padded to the model's `n_vocab` logits; `eos` ends a sequence.
    pub fn new(tokenizer_json: &str, n_vocab: usize, eos: &[u32], shape: Option<CallShape>) -> anyhow::Result<Grammars> {
        let parsed: Value = serde_json::from_str(tokenizer_json)?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&parsed)?;
        let n_vocab = n_vocab.max(words.len());
        // Ids the tokenizer lacks (padding rows of the embedding) become
        // special tokens no grammar refers to: never allowed.
        words.resize(n_vocab, Vec::new());
        for (i, w) in words.iter_mut().enumerate() {
            if w.is_empty() {
                let mut name = format!(".<[{i}]>").into_bytes();
                name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
                *w = name;
            }
        }
        let mut specials: Vec<(String, u32)> = words
            .iter()
            .enumerate()
            .filter(|(_, w)| w.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER) && w.len() > 1)
            .filter_map(|(i, w)| std::str::from_utf8(&w[1..]).ok().map(|s| (s.to_string(), i as u32)))
            .filter(|(s, _)| !s.starts_with("<[") && !s.is_empty())
            .collect();
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let eos_first = eos.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(n_vocab as u32, eos_first);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Grammars {
            factory,
            n_vocab,
            specials,
            shape,
            eos: eos.into(),
            cache: Mutex::new(HashMap::new()),
            uses: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The logits a mask covers.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Each token's bytes (special tokens as their text).
    pub fn token_bytes(&self, token: u32) -> Vec<u8> {
        let trie = self.factory.tok_env().tok_trie();
        if token as usize >= trie.vocab_size() {
            return Vec::new();
        }
        let b = trie.token(token);
        match b.first() {
            Some(&TokTrie::SPECIAL_TOKEN_MARKER) => b[1..].to_vec(),
            _ => b.to_vec(),
        }
    }

    /// The compiled grammar for `req` (from the cache when seen before).
    /// Errors are the request's: a schema that cannot be enforced, a tool
    /// format the model lacks.
    pub fn compile_for(&self, req: &GenerateRequest) -> Result<Arc<Compiled>, ApiError> {
        let lark = self.grammar(req)?;
        self.compile(&lark)
    }

    /// Compiles Lark text (cached by its text).
    pub fn compile(&self, lark: &str) -> Result<Arc<Compiled>, ApiError> {
        let tick = self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((c, used)) = self.cache.lock().unwrap().get_mut(lark) {
            *used = tick;
            return Ok(c.clone());
        }
        let t0 = Instant::now();
        let parser = self.factory.create_parser(TopLevelGrammar::from_lark(lark.to_string()));
        let matcher = Matcher::new(parser);
        if let Some(e) = matcher.get_error() {
            return Err(ApiError::InvalidRequest(format!("cannot enforce this output format: {}", clean_error(&e))));
        }
        let compiled = Arc::new(Compiled {
            proto: Mutex::new(matcher),
            n_vocab: self.n_vocab,
            eos: self.eos.clone(),
            compile_time: t0.elapsed(),
        });
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_ENTRIES {
            if let Some(oldest) = cache.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) {
                cache.remove(&oldest);
            }
        }
        cache.insert(lark.to_string(), (compiled.clone(), tick));
        Ok(compiled)
    }

    /// Compiles `lark` without the cache (for measuring compile time).
    pub fn compile_uncached(&self, lark: &str) -> Result<Duration, ApiError> {
        let t0 = Instant::now();
        let m = Matcher::new(self.factory.create_parser(TopLevelGrammar::from_lark(lark.to_string())));
        match m.get_error() {
            Some(e) => Err(ApiError::InvalidRequest(clean_error(&e))),
            None => Ok(t0.elapsed()),
        }
    }

    /// A JSON schema checked on its own (so an error names its place) and
    /// returned as the grammar's `%json` part.
    fn json_part(&self, schema: &Value, lenient: bool, what: &str) -> Result<String, ApiError> {
        let mut schema = match schema {
            Value::Object(_) => schema.clone(),
            Value::Bool(true) => json!({}),
            _ => return Err(ApiError::InvalidRequest(format!("{what}: a JSON schema must be an object"))),
        };
        let obj = schema.as_object_mut().expect("an object");
        obj.entry("x-guidance").or_insert_with(|| json_options(lenient));
        let text = serde_json::to_string(&schema).expect("JSON serializes");
        let lark = format!("start: %json {text}\n");
        self.compile(&lark).map_err(|e| {
            ApiError::InvalidRequest(format!("{what}: {}", e.message().trim_start_matches("cannot enforce this output format: ")))
        })?;
        Ok(format!("%json {text}"))
    }

    /// `text` as grammar items: string literals, with special tokens as
    /// token references.
    fn literal(&self, text: &str) -> String {
        let mut items = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let hit = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by_key(|(at, len, _)| (*at, std::cmp::Reverse(*len)));
            match hit {
                Some((at, len, id)) => {
                    if at > 0 {
                        items.push(serde_json::to_string(&rest[..at]).expect("a string serializes"));
                    }
                    items.push(format!("<[{id}]>"));
                    rest = &rest[at + len..];
                }
                None => {
                    items.push(serde_json::to_string(rest).expect("a string serializes"));
                    rest = "";
                }
            }
        }
        if items.is_empty() {
            items.push("\"\"".into());
        }
        items.join(" ")
    }

    /// The Lark grammar a request's constraints make.
    pub fn grammar(&self, req: &GenerateRequest) -> Result<String, ApiError> {
        let tools = &req.prompt.tools;
        let format = match &req.format {
            None => None,
            Some(ResponseFormat::JsonObject) => Some(self.json_part(&json!({"type": "object"}), false, "response format")?),
            Some(ResponseFormat::JsonSchema(s)) => Some(self.json_part(s, false, "response format schema")?),
        };
        let uses_tools = !tools.is_empty() && (req.force_tool.is_some() || !req.strict_tools.is_empty());
        let mut rules = Vec::new();
        let calls = if uses_tools {
            let shape = self.shape.as_ref().ok_or_else(|| {
                ApiError::InvalidRequest(
                    "tool calls cannot be constrained: the model has no known tool-call format (strict tools and tool_choice any/tool need one)"
                        .into(),
                )
            })?;
            let chosen: Vec<&Value> = match &req.force_tool {
                Some(ForceTool::Named(n)) => tools.iter().filter(|t| t["function"]["name"] == n.as_str()).collect(),
                _ => tools.iter().collect(),
            };
            let mut alts = Vec::new();
            for (i, t) in chosen.iter().enumerate() {
                let f = &t["function"];
                let name = f["name"].as_str().unwrap_or_default();
                let strict = req.strict_tools.iter().any(|s| s == name);
                let empty = json!({"type": "object"});
                let params = f.get("parameters").filter(|p| !p.is_null()).unwrap_or(&empty);
                // A strict tool's schema must be enforceable (else 400); any
                // other tool's arguments follow its schema as far as the
                // engine can (unsupported keywords are ignored).
                let what = format!("tool {name:?} input schema");
                let args = self.json_part(params, !strict, &what)?;
                rules.push(format!(
                    "call_{i}: {} {args} {}",
                    self.literal(&format!("{}{name}{}", shape.head, shape.mid)),
                    self.literal(&shape.tail)
                ));
                alts.push(format!("call_{i}"));
            }
            if alts.is_empty() {
                return Err(ApiError::InvalidRequest("tool_choice names a tool that is not in tools".into()));
            }
            rules.push(format!("call: {}", alts.join(" | ")));
            Some(shape)
        } else {
            None
        };
        let start = match (&req.force_tool, format, calls) {
            (Some(_), _, Some(_)) => "start: call".to_string(),
            (_, Some(fmt), None) => format!("start: {fmt}"),
            (_, Some(fmt), Some(_)) => format!("start: {fmt} | calls\ncalls: call (\"\\n\"? call)*"),
            (_, None, Some(shape)) => {
                // Free text that never opens a call, then calls (strict tools).
                rules.push(self.free_text_rule(&shape.start));
                "start: text calls?\ncalls: call (\"\\n\"? call)*".to_string()
            }
            (_, None, None) => return Err(ApiError::InvalidRequest("nothing to constrain".into())),
        };
        rules.insert(0, start);
        Ok(rules.join("\n") + "\n")
    }

    /// `text`: output that does not contain the call-opening marker.
    fn free_text_rule(&self, start: &str) -> String {
        if let Some((_, id)) = self.specials.iter().find(|(s, _)| s == start) {
            return format!("text: <[^{id}]>*");
        }
        let mut escaped = String::new();
        for c in start.chars() {
            if "\\/.^$|?*+()[]{}-".contains(c) {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        format!("text: TEXT?\nTEXT: /(?s:.)+/ & ~/(?s:.)*{escaped}(?s:.)*/")
    }
}

/// llguidance's message without the grammar excerpt it quotes.
fn clean_error(e: &str) -> String {
    let first = e.lines().next().unwrap_or(e);
    let msg = match first.find("failed to compile JSON schema: ") {
        Some(at) => &first[at + "failed to compile JSON schema: ".len()..],
        None => first.trim_start_matches(|c: char| c != ':').trim_start_matches(':').trim(),
    };
    if msg.is_empty() {
        first.to_string()
    } else {
        msg.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Prompt, Sampling};

    /// A byte-level BPE tokenizer.json small enough to write here: every
    /// byte, a few merges' results and two special tokens.
    fn tokenizer_json() -> String {
        let mut vocab = serde_json::Map::new();
        let mut id = 0u32;
        // GPT-2's byte-to-char map for the printable bytes only is enough
        // for these tests (ASCII text).
        for b in 0x21u8..=0x7e {
            vocab.insert((b as char).to_string(), json!(id));
            id += 1;
        }
        vocab.insert("Ġ".into(), json!(id));
        id += 1;
        vocab.insert("Ċ".into(), json!(id));
        id += 1;
        for w in ["name", "arguments", "Ġ\"", "\":"] {
            vocab.insert(w.into(), json!(id));
            id += 1;
        }
        json!({
            "added_tokens": [
                {"id": id, "content": "<|end|>", "special": true},
                {"id": id + 1, "content": "<call>", "special": true},
            ],
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": []}
        })
        .to_string()
    }

    fn grammars() -> (Grammars, u32) {
        let j = tokenizer_json();
        let n: usize = 100;
        let eos = 0x7e - 0x21 + 1 + 2 + 4;
        let shape = CallShape {
            start: "<call>".into(),
            head: "<call>{\"name\": \"".into(),
            mid: "\", \"arguments\": ".into(),
            tail: "}".into(),
        };
        (Grammars::new(&j, n, &[eos], Some(shape)).unwrap(), eos)
    }

    fn request(format: Option<ResponseFormat>) -> GenerateRequest {
        let mut r = GenerateRequest::new(Prompt::default(), 10, Sampling::default(), vec![]);
        r.format = format;
        r
    }

    /// Walks the grammar greedily by a fixed preference (the first allowed
    /// token in `prefer`'s order, else the lowest id) and returns the text.
    fn walk(g: &Grammars, c: &Compiled, eos: u32) -> String {
        let mut m = c.matcher();
        let mut row = vec![0u8; g.n_vocab()];
        let mut out = Vec::new();
        let mut last: Vec<u32> = vec![];
        for step in 0..400 {
            m.advance_and_mask(&last, &mut row).unwrap();
            if row[eos as usize] == 1 {
                return String::from_utf8(out).unwrap();
            }
            let allowed: Vec<u32> = (0..g.n_vocab() as u32).filter(|&t| row[t as usize] == 1).collect();
            assert!(!allowed.is_empty(), "no token allowed at step {step}");
            let t = allowed[step % allowed.len()];
            out.extend(g.token_bytes(t));
            last = vec![t];
        }
        panic!("no end after 400 tokens: {}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn a_schema_walk_ends_in_a_valid_document() {
        let (g, eos) = grammars();
        let schema = json!({"type": "object", "properties": {"a": {"enum": ["x", "yy"]}, "b": {"type": "boolean"}},
            "required": ["a", "b"], "additionalProperties": false});
        let c = g.compile_for(&request(Some(ResponseFormat::JsonSchema(schema)))).unwrap();
        let text = walk(&g, &c, eos);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["a"] == "x" || v["a"] == "yy", "{text}");
        assert!(v["b"].is_boolean(), "{text}");
        assert!(text.contains("\": "), "the grammar's spacing: {text}");
    }

    #[test]
    fn unenforceable_schemas_are_request_errors_that_name_the_problem() {
        let (g, _) = grammars();
        for (schema, needle) in [
            (json!({"type": "strin"}), "strin"),
            (json!({"allOf": [{"type": "string"}, {"type": "integer"}]}), "Unsatisfiable"),
            (json!({"type": "string", "minLength": 5, "maxLength": 2}), "minLength"),
            (json!([1]), "must be an object"),
        ] {
            let e = g.compile_for(&request(Some(ResponseFormat::JsonSchema(schema.clone())))).unwrap_err();
            assert!(matches!(e, ApiError::InvalidRequest(_)), "{e:?}");
            assert!(e.message().contains(needle), "{schema}: {}", e.message());
            assert!(!e.message().contains("start: %json"), "no grammar text in the message: {}", e.message());
        }
    }

    #[test]
    fn forced_calls_use_the_call_marker_token_and_the_tools_schema() {
        let (g, eos) = grammars();
        let mut r = request(None);
        r.prompt.tools = vec![
            json!({"type": "function", "function": {"name": "aa", "parameters": {"type": "object",
                "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3}}, "required": ["n"], "additionalProperties": false}}}),
            json!({"type": "function", "function": {"name": "bb", "parameters": {"type": "object"}}}),
        ];
        r.force_tool = Some(ForceTool::Named("aa".into()));
        let lark = g.grammar(&r).unwrap();
        let call_id = g.specials.iter().find(|(s, _)| s == "<call>").unwrap().1;
        assert!(lark.contains(&format!("<[{call_id}]>")), "{lark}");
        let text = walk(&g, &g.compile(&lark).unwrap(), eos);
        let body = text.strip_prefix("<call>").unwrap_or_else(|| panic!("{text}"));
        let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(v["name"], "aa");
        let n = v["arguments"]["n"].as_i64().unwrap();
        assert!((1..=3).contains(&n), "{text}");
    }

    #[test]
    fn strict_tools_leave_text_free_until_a_call_opens() {
        let (g, _) = grammars();
        let mut r = request(None);
        r.prompt.tools = vec![json!({"type": "function", "function": {"name": "aa", "parameters": {"type": "object"}}})];
        r.strict_tools = vec!["aa".into()];
        let c = g.compile_for(&r).unwrap();
        let mut m = c.matcher();
        let mut row = vec![0u8; g.n_vocab()];
        m.advance_and_mask(&[], &mut row).unwrap();
        // Text, the end, and the call marker are all allowed at the start.
        assert!(row.iter().filter(|&&b| b == 1).count() > 90, "{row:?}");
    }

    #[test]
    fn compiled_grammars_are_cached() {
        let (g, _) = grammars();
        let r = request(Some(ResponseFormat::JsonObject));
        let a = g.compile_for(&r).unwrap();
        let b = g.compile_for(&r).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}

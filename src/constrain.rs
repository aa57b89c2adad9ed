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
/// `head` + name + `mid` + arguments + `tail`, the arguments one JSON object,
/// or with `params` a list of parameters. `head` starts with `start`, the
/// marker that opens a call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallShape {
    pub start: String,
    pub head: String,
    pub mid: String,
    pub tail: String,
    #[serde(default)]
    pub params: Option<ParamShape>,
}

/// Arguments as parameters (Qwen3-Coder's `<parameter=k>`, GLM's
/// `<arg_key>`, LFM2's Python-style `k=v`): `open` + key + `mid` + value +
/// `close` each, joined by `sep`; values as JSON, strings as raw text unless
/// `quoted`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamShape {
    pub open: String,
    pub mid: String,
    pub close: String,
    #[serde(default)]
    pub sep: String,
    #[serde(default)]
    pub quoted: bool,
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
                    "tool calls cannot be constrained for this model: it has no known tool-call format whose arguments are JSON or a parameter list (strict tools and tool_choice any/tool need one)"
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
                let args = match &shape.params {
                    None => self.json_part(params, !strict, &what)?,
                    Some(p) => self.param_list(params, strict, &what, p, &format!("v{i}"), &mut rules)?,
                };
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
        format!("text: TEXT?\nTEXT: /(?s:.)+/ & ~/(?s:.)*{}(?s:.)*/", regex_escape(start))
    }

    /// Arguments spelled as parameters: each property of the schema in its
    /// order (required ones always, the others optionally), a string value
    /// as raw text that cannot close the parameter early, any other as JSON
    /// under its schema. Value terminals are named `{prefix}_{j}`.
    fn param_list(
        &self,
        schema: &Value,
        strict: bool,
        what: &str,
        p: &ParamShape,
        prefix: &str,
        rules: &mut Vec<String>,
    ) -> Result<String, ApiError> {
        let empty = serde_json::Map::new();
        let props = schema.get("properties").and_then(Value::as_object).unwrap_or(&empty);
        let required: Vec<&str> =
            schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        // What ends a raw string value (it may not contain it).
        let closer = if p.close.trim().is_empty() { p.sep.trim() } else { p.close.trim_start() };
        if !p.quoted && closer.is_empty() {
            return Err(ApiError::InvalidRequest(format!("{what}: this model's parameter format has no end for a value")));
        }
        let mut items = Vec::new();
        for (j, (key, prop)) in props.iter().enumerate() {
            let what = format!("{what}, property {key:?}");
            let all_strings = |k: &str| match prop.get(k) {
                Some(Value::Array(a)) => !a.is_empty() && a.iter().all(Value::is_string),
                Some(v) => v.is_string(),
                None => false,
            };
            let kind = match prop.get("type").and_then(Value::as_str) {
                None if all_strings("enum") || all_strings("const") => Some("string"),
                t => t,
            };
            let value = match kind {
                _ if p.quoted => self.json_part(prop, !strict, &what)?,
                Some("string") => {
                    let terminal = format!("{}_{j}", prefix.to_uppercase());
                    rules.push(format!("{terminal}: {}", self.raw_string(prop, strict, closer, &what)?));
                    terminal
                }
                Some(_) => self.json_part(prop, !strict, &what)?,
                // No single type: as text when the schema is only a hint.
                None if !strict => {
                    let terminal = format!("{}_{j}", prefix.to_uppercase());
                    rules.push(format!("{terminal}: {}", self.raw_string(&json!({}), false, closer, &what)?));
                    terminal
                }
                None => {
                    return Err(ApiError::InvalidRequest(format!(
                        "{what}: this model's tool calls spell arguments as parameters, which need one \"type\" per property"
                    )))
                }
            };
            let item = format!("{} {value} {}", self.literal(&format!("{}{key}{}", p.open, p.mid)), self.literal(&p.close));
            items.push((item, required.contains(&key.as_str())));
        }
        Ok(self.joined(&items, &p.sep))
    }

    /// Grammar items in order, optional ones maybe left out, with `sep`
    /// between those present: one alternative per possible first item (any
    /// optional one up to the first required), each followed by the rest.
    fn joined(&self, items: &[(String, bool)], sep: &str) -> String {
        let sep = if sep.is_empty() { String::new() } else { format!("{} ", self.literal(sep)) };
        let rest = |from: usize| -> String {
            items[from..]
                .iter()
                .map(|(item, required)| if *required { format!("{sep}{item}") } else { format!("({sep}{item})?") })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut alts = Vec::new();
        for (f, (item, required)) in items.iter().enumerate() {
            alts.push(format!("{item} {}", rest(f + 1)));
            if *required {
                break;
            }
        }
        if items.iter().all(|(_, required)| !required) {
            alts.push("\"\"".into());
        }
        format!("({})", alts.join(" | "))
    }

    /// A string parameter's value as a terminal: its enum, const or pattern,
    /// else any text of its length bounds that does not contain `closer`.
    fn raw_string(&self, prop: &Value, strict: bool, closer: &str, what: &str) -> Result<String, ApiError> {
        if let Some(options) = prop.get("enum").and_then(Value::as_array) {
            let texts: Vec<String> = options.iter().filter_map(Value::as_str).map(regex_escape).collect();
            if texts.is_empty() {
                return Err(ApiError::InvalidRequest(format!("{what}: a string enum needs string values")));
            }
            return Ok(format!("/({})/", texts.join("|")));
        }
        if let Some(c) = prop.get("const").and_then(Value::as_str) {
            return Ok(format!("/{}/", regex_escape(c)));
        }
        if let Some(pattern) = prop.get("pattern").and_then(Value::as_str) {
            let body = pattern.strip_prefix('^').unwrap_or(pattern);
            let body = body.strip_suffix('$').filter(|b| !b.ends_with('\\')).unwrap_or(body);
            return Ok(format!("/{}/", body.replace('/', "\\/")));
        }
        if strict && prop.get("format").is_some() {
            return Err(ApiError::InvalidRequest(format!(
                "{what}: \"format\" cannot be enforced in this model's parameter-style tool calls"
            )));
        }
        let min = prop.get("minLength").and_then(Value::as_u64).unwrap_or(0);
        let max = prop.get("maxLength").and_then(Value::as_u64).map(|m| m.to_string()).unwrap_or_default();
        Ok(format!("/(?s:.){{{min},{max}}}/ & ~/(?s:.)*{}(?s:.)*/", regex_escape(closer)))
    }
}

/// `text` as a regular expression that matches it literally (inside `/.../`).
fn regex_escape(text: &str) -> String {
    let mut escaped = String::new();
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            _ => {
                if "\\/.^$|?*+()[]{}-&~".contains(c) {
                    escaped.push('\\');
                }
                escaped.push(c);
            }
        }
    }
    escaped
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
            params: None,
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
        walk_from(g, c, eos, 0)
    }

    /// `walk` with another choice per step (`seed` shifts the pick).
    fn walk_from(g: &Grammars, c: &Compiled, eos: u32, seed: usize) -> String {
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
            let t = allowed[(step * (seed + 1) + seed) % allowed.len()];
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

    /// Qwen3-Coder / GLM style: arguments as parameters, strings raw.
    #[test]
    fn parameter_style_calls_follow_each_propertys_schema() {
        let j = tokenizer_json();
        let eos = 0x7e - 0x21 + 1 + 2 + 4;
        let p = ParamShape { open: "\n<k>".into(), mid: "</k>=".into(), close: "</v>".into(), sep: "".into(), quoted: false };
        let shape = CallShape {
            start: "<call>".into(),
            head: "<call>".into(),
            mid: ":".into(),
            tail: "\n|end".into(),
            params: Some(p.clone()),
        };
        let g = Grammars::new(&j, 100, &[eos], Some(shape.clone())).unwrap();
        let mut r = request(None);
        r.prompt.tools = vec![json!({"type": "function", "function": {"name": "get", "parameters": {"type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Oslo", "Rome-2 (x&y~)"]},
                "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]$"},
                "note": {"type": "string", "maxLength": 5},
                "days": {"type": "integer", "minimum": 1, "maximum": 3},
                "opt": {"type": "boolean"}},
            "required": ["city", "code", "note", "days"]}}})];
        r.force_tool = Some(ForceTool::Any);
        let lark = g.grammar(&r).unwrap();
        let c = g.compile(&lark).unwrap_or_else(|e| panic!("{e:?}\n{lark}"));
        for seed in 0..4 {
            let text = walk_from(&g, &c, eos, seed);
            let body =
                text.strip_prefix("<call>get:").and_then(|t| t.strip_suffix("\n|end")).unwrap_or_else(|| panic!("{text:?}"));
            let mut args = std::collections::HashMap::new();
            for part in body.split(p.open.as_str()).skip(1) {
                let (k, v) = part.split_once(p.mid.as_str()).unwrap_or_else(|| panic!("{text:?}"));
                args.insert(k.to_string(), v.strip_suffix(p.close.as_str()).unwrap_or_else(|| panic!("{text:?}")).to_string());
            }
            assert!(["Oslo", "Rome-2 (x&y~)"].contains(&args["city"].as_str()), "{text:?}");
            let code = args["code"].as_bytes();
            assert!(
                code.len() == 4 && code[..2].iter().all(u8::is_ascii_uppercase) && code[2] == b'-' && code[3].is_ascii_digit(),
                "{text:?}"
            );
            assert!(args["note"].chars().count() <= 5 && !args["note"].contains("</v>"), "{text:?}");
            assert!(["1", "2", "3"].contains(&args["days"].as_str()), "{text:?}");
            if let Some(o) = args.get("opt") {
                assert!(o == "true" || o == "false", "{text:?}");
            }
        }
        // A property without one type cannot be spelled strictly.
        r.strict_tools = vec!["get".into()];
        r.prompt.tools[0]["function"]["parameters"]["properties"]["x"] =
            json!({"anyOf": [{"type": "string"}, {"type": "integer"}]});
        let e = g.grammar(&r).unwrap_err();
        assert!(e.message().contains("\"x\""), "{}", e.message());
    }

    /// LFM2's Python-style calls: `[name(k=v, ...)]`, every value JSON,
    /// separators only between the arguments present.
    #[test]
    fn python_style_calls_join_the_arguments_present() {
        let j = tokenizer_json();
        let eos = 0x7e - 0x21 + 1 + 2 + 4;
        let p = ParamShape { open: "".into(), mid: "=".into(), close: "".into(), sep: ", ".into(), quoted: true };
        let shape =
            CallShape { start: "<call>".into(), head: "<call>[".into(), mid: "(".into(), tail: ")]".into(), params: Some(p) };
        let g = Grammars::new(&j, 100, &[eos], Some(shape)).unwrap();
        let mut r = request(None);
        r.prompt.tools = vec![json!({"type": "function", "function": {"name": "get", "parameters": {"type": "object",
            "properties": {
                "a": {"type": "boolean"},
                "city": {"enum": ["Oslo", "Rome"]},
                "b": {"type": "integer", "minimum": 1, "maximum": 3},
                "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]$"}},
            "required": ["city", "code"]}}})];
        r.force_tool = Some(ForceTool::Named("get".into()));
        let c = g.compile_for(&r).unwrap();
        let mut seen_a = [false, false];
        for seed in 0..8 {
            let text = walk_from(&g, &c, eos, seed);
            let body = text.strip_prefix("<call>[get(").and_then(|t| t.strip_suffix(")]")).unwrap_or_else(|| panic!("{text:?}"));
            let args: serde_json::Map<String, Value> = body
                .split(", ")
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{text:?}"));
                    (k.to_string(), serde_json::from_str(v).unwrap_or_else(|e| panic!("{text:?}: {e}")))
                })
                .collect();
            assert!(args["city"] == "Oslo" || args["city"] == "Rome", "{text:?}");
            assert!(args["code"].as_str().is_some_and(|c| c.len() == 4 && c.as_bytes()[2] == b'-'), "{text:?}");
            assert!(args.get("b").is_none_or(|b| (1..=3).contains(&b.as_i64().unwrap())), "{text:?}");
            seen_a[args.contains_key("a") as usize] = true;
        }
        assert!(seen_a[0] && seen_a[1], "the optional argument both left out and given");
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

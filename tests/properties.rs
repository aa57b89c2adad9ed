//! Property tests (proptest) for the parsers, the SSE encoder and the stop
//! matcher: whatever a client sends, conversion returns Ok or a 4xx error,
//! never a panic or a 5xx. Failing cases proptest finds are saved under
//! tests/properties.proptest-regressions and replayed first on every run.

use pensieve::api::anthropic::MessagesRequest;
use pensieve::api::ollama::{ChatRequest as OllamaChat, GenerateRequestBody as OllamaGenerate};
use pensieve::api::openai::{ChatRequest, CompletionRequest};
use pensieve::api::parse_json;
use pensieve::api::responses::ResponsesRequest;
use pensieve::stop::StopMatcher;
use proptest::prelude::*;
use serde_json::{json, Value};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("user"),
            Just("assistant"),
            Just("system"),
            Just("tool"),
            Just("text"),
            Just("tool_use"),
            Just("tool_result"),
            Just("image"),
            Just("function"),
            Just("auto"),
            Just("any"),
            Just("none")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("type".to_string()),
                        Just("role".to_string()),
                        Just("content".to_string()),
                        Just("text".to_string()),
                        Just("name".to_string()),
                        Just("input".to_string()),
                        Just("id".to_string()),
                        "[a-z_]{1,8}"
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A valid request with one field replaced by arbitrary JSON.
fn mutated(base: Value, fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    (prop::sample::select(fields), arb_json()).prop_map(move |(k, v)| {
        let mut b = base.clone();
        b[k] = v;
        b
    })
}

fn anthropic_base() -> Value {
    json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
}

fn openai_base() -> Value {
    json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
}

fn assert_client_error(r: Result<(), pensieve::error::ApiError>) {
    if let Err(e) = r {
        assert!(e.status().is_client_error(), "{e:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/properties.proptest-regressions"),
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_bytes_parse_to_ok_or_400(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        assert_client_error(parse_json::<MessagesRequest>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<ChatRequest>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<CompletionRequest>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<OllamaChat>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<OllamaGenerate>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<ResponsesRequest>(&bytes).and_then(|r| r.to_generate(&[])).map(|_| ()));
    }

    #[test]
    fn mutated_responses_requests_convert_or_fail_cleanly(
        v in mutated(json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                            "max_output_tokens": 5, "tools": [{"type": "function", "name": "f", "parameters": {}}]}),
                     &["model", "input", "instructions", "tools", "tool_choice", "max_output_tokens", "temperature",
                       "top_p", "text", "reasoning", "store", "previous_response_id", "stream", "metadata"])
    ) {
        let bytes = v.to_string().into_bytes();
        assert_client_error(parse_json::<ResponsesRequest>(&bytes).and_then(|r| r.to_generate(&[])).map(|_| ()));
    }

    #[test]
    fn any_json_converts_or_fails_cleanly(v in arb_json()) {
        let bytes = v.to_string().into_bytes();
        assert_client_error(parse_json::<MessagesRequest>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<ChatRequest>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<OllamaChat>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<OllamaGenerate>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<ResponsesRequest>(&bytes).and_then(|r| r.to_generate(&[])).map(|_| ()));
    }

    #[test]
    fn mutated_ollama_requests_convert_or_fail_cleanly(
        v in mutated(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
                            "options": {"temperature": 0.5, "num_predict": 5}}),
                     &["model", "messages", "prompt", "options", "format", "think", "tools", "stream", "keep_alive",
                       "system", "raw", "images", "suffix"])
    ) {
        let bytes = v.to_string().into_bytes();
        assert_client_error(parse_json::<OllamaChat>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
        assert_client_error(parse_json::<OllamaGenerate>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
    }

    #[test]
    fn mutated_anthropic_requests_convert_or_fail_cleanly(
        v in mutated(anthropic_base(), &["model", "max_tokens", "messages", "system", "tools", "tool_choice",
                                         "stop_sequences", "temperature", "top_p", "top_k", "thinking", "stream"])
    ) {
        let bytes = v.to_string().into_bytes();
        assert_client_error(parse_json::<MessagesRequest>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
    }

    #[test]
    fn mutated_openai_requests_convert_or_fail_cleanly(
        v in mutated(openai_base(), &["model", "max_tokens", "messages", "tools", "tool_choice", "stop", "n",
                                      "temperature", "top_p", "seed", "stream_options", "max_completion_tokens"])
    ) {
        let bytes = v.to_string().into_bytes();
        assert_client_error(parse_json::<ChatRequest>(&bytes).and_then(|r| r.to_generate()).map(|_| ()));
    }

    #[test]
    fn sse_data_is_one_line_and_round_trips(s in "\\PC*|[\\n\\r\\t\\u{2028}]{0,4}") {
        let ev = pensieve::sse::encode(Some("content_block_delta"), &json!({"text": s}));
        prop_assert!(ev.ends_with("\n\n"));
        prop_assert_eq!(ev.matches('\n').count(), 3);
        let data = ev.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
        let back: Value = serde_json::from_str(data).unwrap();
        prop_assert_eq!(back["text"].as_str().unwrap(), s.as_str());
    }

    #[test]
    fn the_host_check_refuses_names_that_are_not_this_server(
        name in "[a-z][a-z0-9-]{0,20}(\\.[a-z0-9-]{1,10}){1,3}\\.?",
        port in proptest::option::of(any::<u16>()),
        junk in "\\PC{0,40}",
    ) {
        let p = pensieve::server::guard::AccessPolicy::from_config(&pensieve::Config::default_for_tests());
        let with_port = |h: &str| match port { Some(n) => format!("{h}:{n}"), None => h.to_string() };
        let lower = name.trim_end_matches('.');
        if lower != "localhost" && !lower.ends_with(".localhost") {
            prop_assert!(!p.host_allowed(&with_port(&name)), "{}", name);
            prop_assert!(!p.host_allowed(&with_port(&name.to_uppercase())), "{}", name);
        }
        prop_assert!(p.host_allowed(&with_port("127.0.0.1")));
        prop_assert!(p.host_allowed(&with_port("localhost")));
        // Whatever arrives, the check answers (no panic).
        let _ = p.host_allowed(&junk);
    }

    #[test]
    fn stop_sequence_limits_hold_in_both_dialects(
        lens in prop::collection::vec(prop_oneof![0usize..4, 1000usize..1100], 0..70),
        fill in "[aé日]",
    ) {
        let stops: Vec<String> = lens.iter().map(|&n| fill.repeat(n.div_ceil(fill.len()))).collect();
        let total: usize = stops.iter().map(String::len).sum();
        let fits = |max: usize| stops.len() <= max
            && stops.iter().all(|s| !s.is_empty() && s.len() <= pensieve::api::MAX_STOP_BYTES)
            && total <= pensieve::api::MAX_STOPS_TOTAL_BYTES;
        let mut a = anthropic_base();
        a["stop_sequences"] = json!(stops);
        let r = parse_json::<MessagesRequest>(a.to_string().as_bytes()).and_then(|r| r.to_generate());
        prop_assert_eq!(r.is_ok(), fits(64), "{:?}", r.err());
        if let Err(e) = r {
            prop_assert_eq!(e.status().as_u16(), 400);
        }
        let mut o = openai_base();
        o["stop"] = json!(stops);
        let r = parse_json::<ChatRequest>(o.to_string().as_bytes()).and_then(|r| r.to_generate());
        prop_assert_eq!(r.is_ok(), fits(4), "{:?}", r.err());
    }

    #[test]
    fn stop_matcher_agrees_with_searching_the_whole_text(
        text in "[abé日]{0,30}",
        stops in prop::collection::vec("[abé日]{1,3}", 1..3),
        cuts in prop::collection::vec(0usize..40, 0..6),
    ) {
        // Fragment the text at char boundaries.
        let chars: Vec<char> = text.chars().collect();
        let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(chars.len())).collect();
        points.sort();
        let mut frags = vec![];
        let mut last = 0;
        for p in points.into_iter().chain([chars.len()]) {
            frags.push(chars[last..p].iter().collect::<String>());
            last = p;
        }
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        let mut matched = None;
        for f in &frags {
            let o = m.push(f);
            out.push_str(&o.emit);
            if o.matched.is_some() {
                matched = o.matched;
                break;
            }
        }
        if matched.is_none() {
            out.push_str(&m.flush());
        }
        // Reference: generation stops at the first fragment after which some
        // stop sequence is complete in the text so far, cut where the
        // earliest-starting complete one begins. (A longer stop that starts
        // earlier but is not complete yet does not count: the first fuzz run
        // found the property had this wrong — see the regressions file.)
        let mut so_far = String::new();
        let mut expected: Option<String> = None;
        for f in &frags {
            so_far.push_str(f);
            if let Some(pos) = stops.iter().filter_map(|s| so_far.find(s.as_str())).min() {
                expected = Some(so_far[..pos].to_string());
                break;
            }
        }
        match expected {
            Some(cut) => {
                prop_assert!(matched.is_some());
                prop_assert_eq!(&out, &cut);
            }
            None => {
                prop_assert!(matched.is_none());
                prop_assert_eq!(&out, &text);
            }
        }
    }
}

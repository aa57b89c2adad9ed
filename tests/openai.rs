//! The OpenAI-compatible API against the real server and demo model.

mod common;

use common::{client, parse_sse, shared};
use serde_json::{json, Value};

fn chat(max_tokens: u64) -> Value {
    json!({"model": "gpt-test", "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hello there, what is the weather in Paris?"}]})
}

#[tokio::test]
async fn chat_completion_shape_and_usage() {
    let s = shared();
    let (st, r) = s.post("/v1/chat/completions", &chat(9)).await;
    assert_eq!(st, 200, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "gpt-test");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert!(r["choices"][0]["message"]["content"].is_string());
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let u = &r["usage"];
    assert_eq!(u["completion_tokens"], 9);
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + 9);
    // The same conversation through the Anthropic dialect renders the same prompt.
    let (_, count) = s
        .post(
            "/v1/messages/count_tokens",
            &json!({"model": "m", "system": "be brief",
            "messages": [{"role": "user", "content": "hello there, what is the weather in Paris?"}]}),
        )
        .await;
    assert_eq!(u["prompt_tokens"], count["input_tokens"]);
}

#[tokio::test]
async fn chat_stream_chunks_usage_and_done() {
    let s = shared();
    let mut body = chat(10);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = client().post(s.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let evs = parse_sse(&r.text().await.unwrap());
    assert!(evs.iter().all(|(name, _)| name.is_empty()), "OpenAI streams have no event names");
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let chunks: Vec<&Value> = evs.iter().map(|e| &e.1).filter(|v| v.is_object()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let ids: std::collections::HashSet<&str> = chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one id across chunks");
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0)?.get("delta")?.get("content")?.as_str()).collect();
    let finish: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| &c["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 10);
    let (_, full) = s.post("/v1/chat/completions", &chat(10)).await;
    assert_eq!(text, full["choices"][0]["message"]["content"].as_str().unwrap());
}

#[tokio::test]
async fn stop_strings_and_completions() {
    let s = shared();
    let (_, full) = s.post("/v1/chat/completions", &chat(20)).await;
    let text = full["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let mut body = chat(20);
    body["stop"] = json!(stop);
    let (_, r) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["choices"][0]["message"]["content"].as_str().unwrap(), &text[..text.find(&stop).unwrap()]);

    let (st, c) =
        s.post("/v1/completions", &json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0})).await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert!(c["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert_eq!(c["usage"]["completion_tokens"], 6);
    let r = client()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    let evs = parse_sse(&r.text().await.unwrap());
    let streamed: String = evs.iter().filter_map(|e| e.1["choices"].get(0)?.get("text")?.as_str()).collect();
    assert_eq!(streamed, c["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn errors_use_the_openai_shape() {
    let s = shared();
    let cases = vec![
        ("/v1/chat/completions", "{oops".to_string(), 400),
        ("/v1/chat/completions", json!({"messages": []}).to_string(), 400),
        ("/v1/chat/completions", json!({"n": 3, "messages": [{"role": "user", "content": "x"}]}).to_string(), 400),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).to_string(), 400),
        ("/v1/completions", json!({"prompt": 5}).to_string(), 400),
        // A prompt with no tokens at all (the demo tokenizer adds no BOS).
        ("/v1/completions", json!({"prompt": "", "max_tokens": 3}).to_string(), 400),
    ];
    for (path, body, status) in cases {
        let r = client().post(s.url(path)).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path} {body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"].as_object().unwrap().contains_key("param"));
        assert!(v["error"].as_object().unwrap().contains_key("code"));
    }
    let r = client().get(s.url("/v1/chat/completions")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
}

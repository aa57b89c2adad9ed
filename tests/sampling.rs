//! Sampling for clients that send none (Claude Code sends no temperature):
//! the model's own generation config, then the server's flags, and a
//! request's own values always win.

mod common;

use serde_json::{json, Value};

/// A copy of the random-weight model whose generation config asks for greedy decoding.
fn greedy_model() -> std::path::PathBuf {
    let dst = common::copy_of_random_model("greedy-model");
    std::fs::write(dst.join("generation_config.json"), r#"{"temperature": 0.0, "top_p": 0.95}"#).unwrap();
    dst
}

fn ask(temperature: Option<f64>) -> Value {
    let mut v = json!({"model": "m", "max_tokens": 24, "messages": [{"role": "user", "content": "tell me a story"}]});
    if let Some(t) = temperature {
        v["temperature"] = json!(t);
    }
    v
}

async fn text(s: &common::TestServer, body: &Value) -> String {
    let (st, v) = s.post("/v1/messages", body).await;
    assert_eq!(st, 200, "{v}");
    v["content"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_models_defaults_then_flags_then_the_request_decide() {
    let model = greedy_model();
    let mut cfg = common::config();
    cfg.model = vec![model.to_string_lossy().to_string()];
    let s = common::start(cfg.clone());
    let (_, h) = s.get("/health").await;
    assert_eq!(h["model"]["sampling_defaults"]["temperature"], json!({"value": 0.0, "source": "generation_config.json"}), "{h}");
    let greedy = text(&s, &ask(Some(0.0))).await;
    // No temperature sent: the model's generation config (0) decides.
    for _ in 0..3 {
        assert_eq!(text(&s, &ask(None)).await, greedy);
    }

    // A flag overrides the model's default...
    cfg.temperature = Some(1.0);
    let s = common::start(cfg);
    let (_, h) = s.get("/health").await;
    assert_eq!(h["model"]["sampling_defaults"]["temperature"]["source"], "--temperature");
    assert_eq!(h["model"]["sampling_defaults"]["top_p"]["source"], "generation_config.json");
    let mut outs = std::collections::HashSet::new();
    for _ in 0..4 {
        outs.insert(text(&s, &ask(None)).await);
    }
    assert!(outs.len() > 1, "sampled at the flag's temperature: {outs:?}");
    // ...and a request's own value overrides both.
    assert_eq!(text(&s, &ask(Some(0.0))).await, greedy);
    let _ = std::fs::remove_dir_all(model);
}

/// `seed`: the same tokens twice, other tokens with another seed, and the
/// same tokens when the request shares its decode steps with others.
#[tokio::test]
async fn a_seed_fixes_the_draws_alone_and_in_a_batch() {
    let server = common::start(common::config());
    let s = &server;
    let seeded = |seed: u64| {
        json!({"model": "m", "max_tokens": 32, "temperature": 1.0, "seed": seed,
                                    "messages": [{"role": "user", "content": "tell me a story"}]})
    };
    let chat = |body: Value| async move {
        let (st, v) = s.post("/v1/chat/completions", &body).await;
        assert_eq!(st, 200, "{v}");
        v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    };
    let first = chat(seeded(7)).await;
    assert_eq!(chat(seeded(7)).await, first, "same seed, same tokens");
    assert_ne!(chat(seeded(8)).await, first, "another seed, other tokens");
    // Three at once: they share decode steps; the seeded one draws the same.
    let other = |i: u64| {
        json!({"model": "m", "max_tokens": 400, "temperature": 1.0, "seed": 100 + i,
                                "messages": [{"role": "user", "content": "something else entirely"}]})
    };
    let later = async {
        // Joins the two long generations once they run.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        chat(seeded(7)).await
    };
    let (a, _, _) = tokio::join!(later, chat(other(1)), chat(other(2)));
    assert_eq!(a, first, "the seeded draw does not depend on the batch");
    let (_, h) = s.get("/health").await;
    assert!(h["slots"]["peak_batch"].as_u64().unwrap() >= 3, "the seeded request shared decode steps: {h}");
}

/// top_k and top_p against the model's exact next-token probabilities
/// (tests/clients/sampling_stats.py: 200 seeded draws per setting).
#[test]
fn top_k_and_top_p_shape_the_distribution_as_they_should() {
    let mut cfg = pensieve::Config::default_for_tests();
    cfg.model = vec![pensieve::config::BUILTIN_DEMO.into()];
    cfg.api_key = Some("stats-key".into()); // /health then names the model folder
    let s = common::start(cfg);
    common::run_checks("sampling_stats.py", &[&s.base, "stats-key"]);
}

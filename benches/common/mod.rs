//! What the engine benches share: the random-weight bench models and their
//! prompts.

#![allow(dead_code)] // each bench uses a part of it

use pensieve::engine::{ChatMessage, GenerateRequest, Prompt, Sampling};

/// The folder of a random-weight bench model of `shape` (see
/// python/pensieve_shim/modelmaker.py), made on first use.
pub fn bench_model_dir(shape: &str) -> String {
    let dir = format!("{}/target/bench-models/{shape}", env!("CARGO_MANIFEST_DIR"));
    if !std::path::Path::new(&dir).join(".complete").exists() {
        eprintln!("creating the {shape} bench model in {dir} (random weights, once)...");
        let ok = std::process::Command::new(format!("{}/bin/python", env!("PENSIEVE_VENV")))
            .args([concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_model.py"), shape, &dir])
            .status()
            .expect("run the venv python");
        assert!(ok.success(), "making the bench model failed");
    }
    dir
}

/// A greedy chat request with one user message.
pub fn greedy_chat(text: String, max_tokens: u64) -> GenerateRequest {
    GenerateRequest::new(
        Prompt { messages: vec![ChatMessage::new("user", text)], ..Default::default() },
        max_tokens,
        Sampling::greedy(),
        vec![],
    )
}

/// `n` words drawn from a small list by `seed` (a prompt no other seed repeats).
pub fn words(seed: u64, n: usize) -> String {
    const W: &[&str] = &["alpha", "bravo", "charlie", "delta", "echo", "weather", "city", "model", "token", "server"];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            W[(x >> 33) as usize % W.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

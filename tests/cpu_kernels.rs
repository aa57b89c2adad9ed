//! pensieve's CPU kernels (src/kernels/) inside a real model, against MLX's
//! own CPU ops on the same weights. Its own test binary: installing the
//! kernels routes MLX's attention and mlx-lm's swiglu process-wide.

mod common;

use serde_json::Value;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is the boiling point of water at sea level?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village at the edge of a forest, there lived",
];

fn compare(model: &str, steps: usize) -> Value {
    let cfg = common::config();
    let prompts: Vec<String> = PROMPTS.iter().map(|s| s.to_string()).collect();
    let report = pensieve::engine::compare_cpu_kernels(&cfg.venv_dir(), model, &cfg.cache_root(), &prompts, steps).unwrap();
    eprintln!("{report}");
    serde_json::from_str(&report).unwrap()
}

/// SmolLM2's Q4_1/Q8_0 GGUF weights: the kernels (weights dequantized in
/// registers for decode, in tiles through sgemm for prefill, the fused
/// attention, swiglu) compute the float32 model's logits to rounding, after
/// prefill and along a greedy continuation, so the greedy tokens are the
/// reference's. (With `PENSIEVE_DECODE_PATH=integer`, decode and short
/// prompts are held to quantization tolerance instead.)
#[test]
fn the_kernels_compute_what_mlx_computes_on_smollm2() {
    let r = compare(pensieve::config::BUILTIN_SMOLLM2, 16);
    assert_eq!(r["kernels"]["used"], true, "{}", r["kernels"]);
    assert!(r["kernels"]["layers"].as_u64().unwrap() >= 200, "every quantized layer moved: {}", r["kernels"]);
    // Every decoder layer runs fused (q/k/v + rope, attention, gate/up +
    // swiglu, norms and skip connections inside the products).
    assert_eq!(r["kernels"]["fused_layers"], 30, "{}", r["kernels"]);
    let mut agree = 0;
    let mut total = 0;
    let exact = std::env::var("PENSIEVE_DECODE_PATH").as_deref() != Ok("integer");
    let tolerance = if exact { 1e-3 } else { 0.12 };
    for (p, text) in r["prompts"].as_array().unwrap().iter().zip(PROMPTS) {
        let (rg, kg) = (p["reference_greedy"].as_array().unwrap(), p["kernels_greedy"].as_array().unwrap());
        let (diff, range) = (p["prefill_diff"].as_f64().unwrap(), p["prefill_range"].as_f64().unwrap());
        if p["prompt_tokens"].as_u64().unwrap() > pensieve::kernels::quant::SMALL_N as u64 || exact {
            assert!(diff <= 1e-3 * range, "prefill logits of {text:?} off by {diff} (range {range})");
            assert_eq!(rg[0], kg[0], "the greedy token after prefill of {text:?}");
        } else {
            assert!(diff <= tolerance * range, "prefill logits of {text:?} off by {diff} (range {range})");
        }
        let (diff, range) = (p["decode_diff"].as_f64().unwrap(), p["decode_range"].as_f64().unwrap());
        assert!(diff <= tolerance * range, "decode logits off by {diff} (range {range})");
        agree += rg.iter().zip(kg).filter(|(a, b)| a == b).count();
        total += rg.len();
    }
    eprintln!("greedy agreement along the reference's continuations: {agree}/{total}");
    // rope and rms_norm on their own, against MLX's: strided inputs, both
    // pairings, partial rotation, 3-d inputs, per-row offsets, custom
    // frequencies, norms with and without a weight.
    let ops = r["ops"].as_object().unwrap();
    assert!(ops.len() >= 10, "{ops:?}");
    for (case, diff) in ops {
        // At position 4095 a float32 angle is only good to ~2.4e-4 rad
        // (4095 * 2^-24): there the two sines part by that much.
        let tolerance = if case.contains("offsets per row") { 3e-4 } else { 1e-5 };
        assert!(diff.as_f64().unwrap() <= tolerance, "{case}: off by {diff} of the largest value");
    }
    // Exact to rounding: a near-tie could still fall the other way on
    // another instruction set; 8-bit activations move more.
    let want = if exact { total * 19 / 20 } else { total * 9 / 10 };
    assert!(agree >= want, "greedy tokens agree at {agree} of {total} steps");
}

/// MLX-quantized models take the kernels too, at 4 and 8 bits and group
/// sizes other than GGUF's 32 (a random-weight model, quantized by mlx-lm).
#[test]
fn mlx_quantized_models_take_the_kernels() {
    let work = std::env::temp_dir().join(format!("pensieve-cpu-kernels-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let f32_dir = work.join("f32");
    let py = common::venv_python();
    let ok = std::process::Command::new(&py)
        .args([concat!(env!("CARGO_MANIFEST_DIR"), "/python/make_model.py"), "demo"])
        .arg(&f32_dir)
        .status()
        .unwrap();
    assert!(ok.success(), "make the random model");
    let tolerance = if std::env::var("PENSIEVE_DECODE_PATH").as_deref() == Ok("integer") { 0.12 } else { 1e-3 };
    for (bits, group) in [(4, 64), (8, 32)] {
        let q_dir = work.join(format!("q{bits}-g{group}"));
        let script = format!(
            "import mlx_lm; mlx_lm.convert({:?}, {:?}, quantize=True, q_bits={bits}, q_group_size={group})",
            f32_dir.to_string_lossy(),
            q_dir.to_string_lossy()
        );
        let ok = std::process::Command::new(&py).args(["-c", &script]).status().unwrap();
        assert!(ok.success(), "quantize to {bits} bits");
        let r = compare(&q_dir.to_string_lossy(), 8);
        assert_eq!(r["kernels"]["used"], true, "{}", r["kernels"]);
        // Every linear layer and the embedding: 7 a layer, 2 layers, 1.
        assert_eq!(r["kernels"]["layers"], 15, "{}", r["kernels"]);
        assert_eq!(r["kernels"]["fused_layers"], 2, "both decoder layers fused: {}", r["kernels"]);
        for p in r["prompts"].as_array().unwrap() {
            let (diff, range) = (p["decode_diff"].as_f64().unwrap(), p["decode_range"].as_f64().unwrap());
            assert!(diff <= tolerance * range.max(1e-3), "{bits}-bit decode logits off by {diff} (range {range})");
            let (diff, range) = (p["prefill_diff"].as_f64().unwrap(), p["prefill_range"].as_f64().unwrap());
            assert!(diff <= tolerance * range.max(1e-3), "{bits}-bit prefill logits off by {diff} (range {range})");
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// The fused layers in the continuous batch: prompts of different lengths
/// decoded together (a batch cache: left padding, a position per row, a
/// mask) give each the greedy text it gets alone, through the real server.
#[test]
fn batched_greedy_decoding_matches_each_alone() {
    let mut cfg = pensieve::Config::default_for_tests();
    cfg.model = vec![pensieve::config::BUILTIN_SMOLLM2.into()];
    let s = common::start(cfg);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let h = rt.block_on(s.get("/health")).1;
    assert_eq!(h["model"]["cpu_kernels"]["fused_layers"], 30, "{h}");
    let questions =
        ["What is the capital of France?", "Name three colors.", "Write a haiku about rain, please, in English.", "What is 2+2?"];
    let ask = |q: &str| {
        let body =
            serde_json::json!({"model": "x", "max_tokens": 40, "temperature": 0, "messages": [{"role": "user", "content": q}]});
        let s = &s;
        async move {
            let (status, v) = s.post("/v1/messages", &body).await;
            assert_eq!(status, 200, "{v}");
            v["content"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let alone: Vec<String> = questions.iter().map(|q| rt.block_on(ask(q))).collect();
    let together = rt.block_on(futures_util::future::join_all(questions.iter().map(|q| ask(q))));
    let h = rt.block_on(s.get("/health")).1;
    assert!(h["slots"]["peak_batch"].as_u64().unwrap() >= 2, "the requests shared decode steps: {}", h["slots"]);
    assert_eq!(together, alone);
    assert_eq!(alone[0], "The capital of France is Paris.");
}

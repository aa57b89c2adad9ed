//! The real `pensieve` binary as a child process: started on a free port,
//! its log lines collected, signalled and waited for like a supervisor would.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub addr: String,
    /// Every log line after the "serving" one.
    pub logs: Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary with no arguments, and none of the user's PENSIEVE_* settings
/// (they must not change what a test sees).
pub fn command_bare() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pensieve"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PENSIEVE_") {
            c.env_remove(k);
        }
    }
    c
}

/// The binary on port 0 (with the random-weight model unless `args` name
/// one), not yet started.
pub fn command(args: &[&str]) -> Command {
    let mut c = command_bare();
    if !args.contains(&"--model") {
        c.args(["--model", "builtin:random"]);
    }
    if !args.contains(&"--cache-dir") {
        c.arg("--cache-dir").arg(pensieve::config::test_cache_dir());
    }
    c.args(["--port", "0"]).args(args).env("RUST_LOG", "info");
    c
}

/// Starts the binary with `umask` (None: inherited) and waits for its
/// "serving" log line; the lines before it are returned too.
pub fn spawn_with(args: &[&str], umask: Option<libc::mode_t>) -> (Server, Vec<String>) {
    let mut cmd = command(args);
    if let Some(m) = umask {
        // SAFETY: umask(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(m);
                Ok(())
            });
        }
    }
    start(cmd)
}

/// Starts a prepared command (see `command`) and waits until it serves.
pub fn spawn_cmd(cmd: Command) -> Server {
    start(cmd).0
}

fn start(mut cmd: Command) -> (Server, Vec<String>) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("the pensieve binary starts");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server never reported its address; log: {before:#?}");
        };
        if let Some(i) = line.find("on http://") {
            let addr = line[i + "on http://".len()..].split_whitespace().next().unwrap_or("").to_string();
            return (Server { child, addr, logs: rx }, before);
        }
        before.push(line);
    }
}

/// Starts the binary (no prefix cache on disk) and waits until it serves.
pub fn spawn(args: &[&str]) -> Server {
    let mut a = vec!["--no-prompt-cache-persist"];
    a.extend_from_slice(args);
    spawn_with(&a, None).0
}

pub fn signal(s: &Server, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(s.child.id() as libc::pid_t, sig) };
}

pub fn wait_exit(s: &mut Server, secs: u64) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            return st;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "the server did not exit within {secs} s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

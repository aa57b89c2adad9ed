//! Test harness: the real server (real engine, real demo model) on 127.0.0.1:0,
//! spoken to over real HTTP.
#![allow(dead_code)]

#[cfg(unix)]
pub mod binary;

use std::sync::OnceLock;

use pensieve::{Config, EngineHandle};
use serde_json::Value;

pub struct TestServer {
    pub base: String,
    pub config: Config,
    /// Set by `start`: dropping the server stops it (see Drop).
    owned: Option<(tokio::sync::oneshot::Sender<()>, std::sync::Mutex<std::sync::mpsc::Receiver<pensieve::server::RunOutcome>>)>,
}

/// A server started with `start` stops when its test lets go of it: its
/// listener closes, its engine (and the model's memory) goes.
impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some((stop, done)) = self.owned.take() {
            let _ = stop.send(());
            let _ = done.into_inner().unwrap_or_else(|e| e.into_inner()).recv_timeout(std::time::Duration::from_secs(30));
        }
    }
}

/// Starts a server with `config` on its own runtime thread; it stops when
/// the returned value is dropped (at the end of the test that holds it).
pub fn start(config: Config) -> TestServer {
    let (mut server, stop, done) = start_controlled(config);
    server.owned = Some((stop, std::sync::Mutex::new(done)));
    server
}

/// A server plus the switch that shuts it down and the way `run` ended.
pub fn start_controlled(
    mut config: Config,
) -> (TestServer, tokio::sync::oneshot::Sender<()>, std::sync::mpsc::Receiver<pensieve::server::RunOutcome>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    config.host = "127.0.0.1".into();
    config.port = 0;
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let cfg = config.clone();
    std::thread::spawn(move || {
        // Started outside the runtime, as `server::serve` does (it blocks until loaded).
        let engine = match EngineHandle::start(&cfg) {
            Ok(e) => e,
            Err(e) => {
                addr_tx.send(Err(format!("{e:#}"))).unwrap();
                return;
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(Ok(listener.local_addr().unwrap())).unwrap();
            let outcome = pensieve::server::run(listener, cfg, engine, async {
                let _ = stop_rx.await;
            })
            .await;
            let _ = done_tx.send(outcome);
        });
    });
    let addr = addr_rx.recv().unwrap().expect("server starts");
    (TestServer { base: format!("http://{addr}"), config, owned: None }, stop_tx, done_rx)
}

/// Defaults with the random-weight demo model: it never says EOS, so tests
/// can count on long generations (streams to cut, slots to hold).
pub fn config() -> Config {
    let mut c = Config::default_for_tests();
    c.model = vec![pensieve::config::BUILTIN_RANDOM.into()];
    c
}

/// The default-config server shared by the tests of one test binary.
pub fn shared() -> &'static TestServer {
    static S: OnceLock<TestServer> = OnceLock::new();
    S.get_or_init(|| start(config()))
}

/// The random-weight model's folder in the test cache (made on first use by
/// the shared server; named by what made it, see generated_model_key).
pub fn random_model_dir() -> std::path::PathBuf {
    shared();
    let root = Config::default_for_tests().cache_root();
    std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            // demo-v2-demo-<12 hex digits> (not demo-v2-demo-think-…)
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            name.strip_prefix("demo-v2-demo-").is_some_and(|h| h.len() == 12 && h.chars().all(|c| c.is_ascii_hexdigit()))
                && p.join(".complete").exists()
        })
        .expect("the random-weight model")
}

/// A copy of the random-weight model's folder under the temp dir (`name`
/// tells copies apart): another model to the server, with the same
/// tokenizer and template, so the same prompt gives the same token ids.
pub fn copy_of_random_model(name: &str) -> std::path::PathBuf {
    let src = random_model_dir();
    let dst = std::env::temp_dir().join(format!("pensieve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    dst
}

/// A 500 from a Python exception: the client sees the exception's class and
/// its request id, never the exception's own text (that goes to the log).
pub fn assert_internal_error(v: &Value, class: &str, raw_text: &str) {
    let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {v}"));
    assert!(msg.contains(&format!("internal error ({class})")), "{v}");
    assert!(!msg.contains(raw_text), "the exception's text stays in the log: {v}");
    if let Some(id) = v["request_id"].as_str() {
        assert!(msg.contains(id), "names its request id: {v}");
    }
}

/// Runs a check script of tests/clients/ with the project venv's Python
/// (its first argument: the shim's python/ folder, then `args`); it must
/// exit 0 and report "N passed, 0 failed". Returns its output.
pub fn run_checks(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(venv_python())
        .arg(format!("{}/tests/clients/{script}", env!("CARGO_MANIFEST_DIR")))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    println!("{stdout}");
    stdout
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(std::time::Duration::from_secs(120)).build().unwrap()
}

impl TestServer {
    /// A server someone else runs (the binary), at `base`.
    pub fn at(base: &str) -> TestServer {
        TestServer { base: base.to_string(), config: Config::default_for_tests(), owned: None }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client().post(self.url(path)).json(body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = client().get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = client().get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// Polls /health until no slot is in use (or panics after `secs`).
    pub async fn wait_idle(&self, secs: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let (_, h) = self.get("/health").await;
            if h["slots"]["in_use"] == 0 && h["slots"]["queued"] == 0 {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "slots never freed: {h}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Parses a complete SSE body into (event name, data) pairs.
pub fn parse_sse(body: &str) -> Vec<(String, Value)> {
    let mut out = vec![];
    for chunk in body.split("\n\n").filter(|c| !c.trim().is_empty()) {
        let mut name = String::new();
        let mut data = String::new();
        for line in chunk.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            } else {
                panic!("unexpected SSE line {line:?}");
            }
        }
        let v = if data == "[DONE]" { Value::String(data) } else { serde_json::from_str(&data).unwrap() };
        out.push((name, v));
    }
    out
}

/// Reads a streaming response until at least `n` complete events arrived.
pub async fn read_events(resp: &mut reqwest::Response, n: usize) -> Vec<(String, Value)> {
    let mut buf = String::new();
    loop {
        let complete = buf.rfind("\n\n").map(|i| &buf[..i + 2]).unwrap_or("");
        let evs = parse_sse(complete);
        if evs.len() >= n {
            return evs;
        }
        match resp.chunk().await.unwrap() {
            Some(c) => buf.push_str(std::str::from_utf8(&c).unwrap()),
            None => return parse_sse(&buf),
        }
    }
}

pub fn venv_python() -> String {
    format!("{}/bin/python", env!("PENSIEVE_VENV"))
}

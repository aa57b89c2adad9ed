//! Ollama's API (`/api/...`) through the official ollama Python client
//! (tests/clients/ollama_client.py) against the trained demo model, which
//! calls its weather tool: chat and generate streamed and not, tools, format,
//! listings, errors in Ollama's shape; and `--ollama-port`.

mod common;

use common::start;
use pensieve::Config;

#[test]
fn the_official_ollama_client_chats_generates_and_lists() {
    let s = start(Config::default_for_tests());
    common::run_checks("ollama_client.py", &[&s.base]);
}

/// `--ollama-port`: the real binary also answers on a second port, where
/// apps with Ollama's address hard-wired look (11434 in real use; a free one
/// here).
#[test]
fn the_ollama_port_serves_the_same_apis() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let s = common::binary::spawn(&["--ollama-port", &port]);
    let out = std::process::Command::new(common::venv_python())
        .args([
            "-c",
            "import sys, httpx, ollama; c = ollama.Client(host=sys.argv[1]); \
             r = c.chat(model='x', messages=[{'role': 'user', 'content': 'hi'}], options={'num_predict': 3}); \
             v = httpx.get(sys.argv[2] + '/api/version').json()['version']; \
             print(len(c.list().models), r.eval_count, r.done_reason, bool(v))",
            &format!("http://127.0.0.1:{port}"),
            &format!("http://{}", s.addr),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The main port answers too (the last field).
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1 3 length True");
}

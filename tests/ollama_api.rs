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

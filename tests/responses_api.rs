//! OpenAI's Responses API (`/v1/responses`, what Codex CLI speaks) through
//! the official openai SDK (tests/clients/responses_client.py) against the
//! trained demo model: streamed and not, the event sequence, a function-tool
//! round trip chained by `previous_response_id` and served from the prefix
//! cache, structured output, the store, errors.

mod common;

use common::start;
use pensieve::Config;

#[test]
fn the_official_sdk_creates_streams_chains_and_stores_responses() {
    let s = start(Config::default_for_tests());
    common::run_checks("responses_client.py", &[&s.base]);
}

#!/usr/bin/env bash
# Builds pensieve, serves the demo model (32k context: Claude Code's ~24k-token
# prompt fits), runs the scripted 20-turn agent session, stops the server.
#   benches/agent_session.sh [--turns 20] [--max-tokens 24]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
port=$((18000 + RANDOM % 1000))
RUST_LOG=warn target/release/pensieve --model builtin:demo --port "$port" --no-prompt-cache-persist &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
.venv/bin/python benches/agent_session.py --url "http://127.0.0.1:$port" "$@"

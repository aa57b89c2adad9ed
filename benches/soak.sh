#!/usr/bin/env bash
# Builds pensieve, starts it on a loopback port with the random-weight demo
# model (long generations), runs benches/soak.py against it, stops it.
#   benches/soak.sh [soak.py args, e.g. --requests 500 --concurrency 16]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
port=$((17000 + RANDOM % 1000))
RUST_LOG=warn target/release/pensieve --model builtin:random --port "$port" --max-concurrent 8 --max-queue 64 &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
# Warm up so the "before" RSS is the steady state after load, not mid-load.
.venv/bin/python benches/soak.py --url "http://127.0.0.1:$port" --requests 48 --concurrency 16 --seed 99 >/dev/null || true
.venv/bin/python benches/soak.py --url "http://127.0.0.1:$port" "$@"

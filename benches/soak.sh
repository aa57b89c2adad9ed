#!/usr/bin/env bash
# Builds pensieve, starts it on a loopback port with the random-weight demo
# model (long generations), runs benches/soak.py against it, stops it.
#   benches/soak.sh [soak.py args, e.g. --requests 500 --concurrency 16]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
port=$((17000 + RANDOM % 1000))
RUST_LOG=warn target/release/pensieve --model builtin:random --port "$port" --max-concurrent 8 --max-queue 64 --no-prompt-cache-persist &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
# Identical warm-up rounds first: allocators, MLX's buffers and the prefix
# cache reach their steady state (RSS plateaus after 2-4 rounds here); the
# last round is the measured one, so growth there would be a leak.
for round in 1 2 3 4; do
  echo "warm-up round $round: $(.venv/bin/python benches/soak.py --url "http://127.0.0.1:$port" --seed $((90 + round)) "$@" | grep 'RSS before' | cut -d';' -f1)"
done
echo "measured round:"
.venv/bin/python benches/soak.py --url "http://127.0.0.1:$port" "$@"

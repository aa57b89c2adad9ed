#!/usr/bin/env bash
# Side-by-side: pensieve vs in-process mlx_lm vs mlx_lm.server (as installed and with the
# same OpenBLAS), same model, same machine, one run. Prints a markdown table and the ratios.
#
#   benches/compare.sh [SHAPE] [extra compare.py args]     SHAPE: smollm-135m (default), smollm-360m, llama-1b
#
# The Linux CPU path against llama.cpp on a GGUF file (issue 14; benches/cpu_compare.py):
#
#   benches/compare.sh --gguf FILE [extra cpu_compare.py args]
#
# installs npm `node-llama-cpp` (llama.cpp's prebuilt CPU build) into target/llama-cpp first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--gguf" ]; then
  gguf=$2; shift 2
  cargo build --release
  if [ ! -d target/llama-cpp/node_modules/node-llama-cpp ]; then
    mkdir -p target/llama-cpp
    (cd target/llama-cpp && npm install --silent --no-save node-llama-cpp@3.22.1)
  fi
  exec .venv/bin/python benches/cpu_compare.py --gguf "$gguf" --pensieve target/release/pensieve \
      --node-path "$PWD/target/llama-cpp/node_modules" --out "target/cpu-compare-$(basename "$gguf" .gguf).json" "$@"
fi
shape=${1:-smollm-135m}; shift || true
cargo build --release
py=.venv/bin/python
model=target/bench-models/$shape
[ -f "$model/.complete" ] || $py python/make_model.py "$shape" "$model"
scripts/python-openblas -c pass   # builds target/libblas_preload.so
$py benches/compare.py --model "$model" --pensieve target/release/pensieve \
    --preload "$PWD/target/libblas_preload.so" --out "target/compare-$shape.json" "$@"

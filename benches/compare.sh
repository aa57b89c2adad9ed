#!/usr/bin/env bash
# Side-by-side: pensieve vs in-process mlx_lm vs mlx_lm.server (as installed and with the
# same OpenBLAS), same model, same machine, one run. Prints a markdown table and the ratios.
#
#   benches/compare.sh [SHAPE] [extra compare.py args]     SHAPE: smollm-135m (default), smollm-360m, llama-1b
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-smollm-135m}; shift || true
cargo build --release
py=.venv/bin/python
model=target/bench-models/$shape
[ -f "$model/.complete" ] || $py python/make_model.py "$shape" "$model"
scripts/python-openblas -c pass   # builds target/libblas_preload.so
$py benches/compare.py --model "$model" --pensieve target/release/pensieve \
    --preload "$PWD/target/libblas_preload.so" --out "target/compare-$shape.json" "$@"

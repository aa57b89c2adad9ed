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
[ -f "$model/.complete" ] || $py python/pensieve_shim.py make-model "$shape" "$model"
site=$($py -c 'import site; print(site.getsitepackages()[0])')
openblas=$site/scipy_openblas32/lib/libscipy_openblas.so
gcc -O2 -shared -fPIC -DOPENBLAS_PATH="\"$openblas\"" benches/blas_preload.c -o target/libblas_preload.so -ldl
$py benches/compare.py --model "$model" --pensieve target/release/pensieve \
    --preload "$PWD/target/libblas_preload.so" --out "target/compare-$shape.json" "$@"

"""Makes a random-weight model folder (a benchmark shape or a built-in test
model): python python/make_model.py SHAPE DEST [float32|bfloat16|float16];
or the Qwen2-architecture twin of a llama model folder (same answers; mlx-lm
shards Qwen2 in pipeline mode): python python/make_model.py qwen2-twin SRC DEST"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pensieve_shim.modelmaker import main  # noqa: E402

main(sys.argv[1:])

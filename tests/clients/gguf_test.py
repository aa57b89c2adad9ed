"""The GGUF path (python/pensieve_gguf.py), against references that can fail:

- round trip: random-weight llama / qwen2 / qwen3 models written as GGUF the
  way llama.cpp lays files out (its tensor names, llama's Q/K rows permuted,
  F32 / F16 / Q8_0), converted back: the tokenizer gives the same ids and the
  logits match the original (exactly for F32);
- the real SmolLM2-135M-Instruct Q4_1 file: perplexity on a fixed English
  paragraph below a bound that the same file converted with llama.cpp's Q/K
  layout left in place (a mis-conversion) cannot reach;
- an architecture the converter does not know is a clear error naming it.

Usage: gguf_test.py PATH_TO_python/ SMOLLM2_GGUF WORK_DIR
"""
import json
import os
import sys
import time

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import check, done  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import pensieve_gguf as pg  # noqa: E402
import pensieve_shim as ps  # noqa: E402

SMOLLM2, WORK = sys.argv[2], sys.argv[3]
PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower. "
    "Locally nicknamed the Iron Lady, it was constructed from 1887 to 1889 as the centerpiece of the 1889 "
    "World's Fair, and to crown the centennial anniversary of the French Revolution."
)


def weights_match(gguf_file, folder, shape):
    import gguf
    import numpy as np

    converted = mx.load(os.path.join(folder, "model.safetensors"))
    reader = gguf.GGUFReader(gguf_file)
    heads = {"attn_q": 4, "attn_k": 2}
    worst = 0.0
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type)).astype(np.float32)
        a = a.reshape([int(x) for x in reversed(t.shape.tolist())])
        part = t.name.split(".")
        if shape == "demo" and len(part) == 4 and part[2] in heads and part[3] == "weight":
            a = np.array(pg.unpermute_qk(mx.array(a), heads[part[2]]))
        name = pg.hf_name(t.name)
        if name not in converted:
            continue  # tied embeddings: no separate lm_head
        c = converted[name]
        stem = name[: -len(".weight")]
        if f"{stem}.scales" in converted:  # kept packed: MLX's reading of the file's quantized type
            s, b = converted[f"{stem}.scales"], converted[f"{stem}.biases"]
            c = mx.dequantize(c, s, b, group_size=32, bits=c.shape[-1] * 32 // (s.shape[-1] * 32))
        worst = max(worst, float(np.abs(np.array(c.astype(mx.float32)) - a).max()))
    return worst


def perplexity(folder):
    m, t = pg.load(folder)
    ids = t.encode(PARAGRAPH)
    logits = m(mx.array([ids[:-1]]))[0]
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(lp, mx.array(ids[1:])[:, None], axis=-1).mean()
    return float(mx.exp(nll))


for shape in ("demo", "demo-qwen2", "demo-qwen3"):
    src = ps.make_model(os.path.join(WORK, shape), shape)
    m, t = mlx_lm.load(src)
    text = t.apply_chat_template([{"role": "user", "content": "hello world, weather in Paris today?"}],
                                 add_generation_prompt=True, tokenize=False)
    ids = t.encode(text, add_special_tokens=False)
    ref = m(mx.array([ids]))
    # Q8_0 and Q4_0 MLX reads itself; Q5_0 it cannot (the gguf package
    # dequantizes it, as it does the K-quants).
    for qtype, tol in (("F32", 1e-5), ("F16", 0.02), ("Q8_0", 0.15), ("Q4_0", None), ("Q5_0", None)):
        gguf_file = os.path.join(WORK, f"{shape}.{qtype}.gguf")
        pg.write(src, gguf_file, qtype)
        out = os.path.join(WORK, f"{shape}-{qtype}")
        pg.convert(gguf_file, out, True)
        m2, t2 = pg.load(out)
        # On the CPU backend every weight is float32 once loaded.
        dtypes = {v.dtype for _, v in tree_flatten(m2.parameters())}
        check(f"{shape} {qtype} float32 in memory", dtypes == {mx.float32}, dtypes)
        ids2 = t2.encode(t2.apply_chat_template([{"role": "user", "content": "hello world, weather in Paris today?"}],
                                                add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        check(f"{shape} {qtype} tokenizer and template", ids2 == ids, f"{ids2} != {ids}")
        if tol is not None:
            diff = float(mx.abs(m2(mx.array([ids])) - ref).max())
            check(f"{shape} {qtype} logits", diff <= tol, f"max |diff| {diff} > {tol}")
        # Every converted tensor equals the gguf package's own reading of the
        # file (its numpy dequantizer, llama's Q/K rows un-permuted).
        worst = weights_match(gguf_file, out, shape)
        check(f"{shape} {qtype} weights", worst <= 1e-3, f"max |diff| {worst}")  # MLX dequantizes in float16
    print(f"{shape}: round trip through F32/F16/Q8_0/Q4_0/Q5_0 GGUF checked")

# Metal and CUDA keep MLX's quantized format: the same conversion without
# dequantizing gives 4-bit MLX weights (checked here on the CPU backend).
demo_f32 = os.path.join(WORK, "demo.F32.gguf")
kept = os.path.join(WORK, "demo-kept-quantized")
pg.convert(demo_f32, kept, False)
with open(os.path.join(kept, "config.json")) as f:
    check("kept quantized: config", json.load(f).get("quantization") == {"group_size": 32, "bits": 8},
          "F32 files re-quantize at 8 bits")
mq, tq = mlx_lm.load(kept)
md, td = pg.load(os.path.join(WORK, "demo-F32"))
ids = td.encode("hello world")
rel = float(mx.abs(mq(mx.array([ids])) - md(mx.array([ids]))).max() / mx.abs(md(mx.array([ids]))).max())
check("kept quantized: logits", rel < 0.05, rel)

# A folder holding one GGUF file names it; two are ambiguous.
folder = os.path.join(WORK, "one-gguf")
os.makedirs(folder, exist_ok=True)
os.symlink(demo_f32, os.path.join(folder, "model.gguf"))
check("folder with one .gguf", pg.find_gguf(folder) == os.path.join(folder, "model.gguf"), pg.find_gguf(folder))
os.symlink(demo_f32, os.path.join(folder, "other.gguf"))
try:
    pg.find_gguf(folder)
    check("folder with two .gguf", False, "no error")
except pg.GGUFError as e:
    check("folder with two .gguf", "several GGUF files" in str(e), str(e))

t0 = time.perf_counter()
pg.convert(SMOLLM2, os.path.join(WORK, "smollm2"), True)
seconds = time.perf_counter() - t0
# Loading unpacks to float32 exactly as MLX's own dequantize does.
for bits in (4, 8):
    w = mx.random.normal((96, 128))
    q, s, b = mx.quantize(w, group_size=32, bits=bits)
    diff = float(mx.abs(pg.unpack(q, s, b, 32, bits) - mx.dequantize(q, s, b, group_size=32, bits=bits)).max())
    check(f"unpack {bits}-bit equals mx.dequantize", diff == 0.0, diff)
# Q4_1 stays packed on disk: the conversion costs about what the file does.
size, folder_size = os.path.getsize(SMOLLM2), os.path.getsize(os.path.join(WORK, "smollm2", "model.safetensors"))
check("packed on disk", folder_size < 1.5 * size, f"{folder_size} bytes for a {size}-byte file")
pg.convert(SMOLLM2, os.path.join(WORK, "smollm2-wrong-qk"), True, permute_qk=False)
right, wrong = perplexity(os.path.join(WORK, "smollm2")), perplexity(os.path.join(WORK, "smollm2-wrong-qk"))
print(f"SmolLM2 Q4_1 converted in {seconds:.1f}s ({folder_size / 2**20:.0f} MiB on disk, float32 in memory); perplexity {right:.2f} (Q/K layout left as llama.cpp's: {wrong:.2f})")
check("SmolLM2 perplexity", right < 15.0, right)
check("a mis-conversion cannot pass the bound", wrong > 15.0, wrong)

try:
    pg._config({"general.architecture": "mamba", "tokenizer.ggml.tokens": []}, {})
    check("unknown architecture", False, "no error")
except pg.GGUFError as e:
    check("unknown architecture", "'mamba' is not supported" in str(e), str(e))

done()

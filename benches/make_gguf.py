"""GGUF files for benches/compare.sh --gguf: the CPU path against llama.cpp on other
formats and sizes than the shipped SmolLM2 Q4_1.

  make_gguf.py TEMPLATE.gguf DEST.gguf Q8_0|Q4_0|Q4_1                    the template's weights, requantized
  make_gguf.py TEMPLATE.gguf DEST.gguf Q4_0 --shape llama-1b [--seed N]  random weights of that shape

Both keep the template's tokenizer and chat template (llama architecture). Random weights
are fine for speed: every product and every byte read is the same as a trained model's.
"""

import argparse
import os
import sys

import numpy as np
import gguf

SHAPES = {
    # Llama-3.2-1B's layout with SmolLM2's vocabulary: ~1.2B parameters.
    "llama-1b": dict(embd=2048, layers=16, ffn=8192, heads=32, kv_heads=8),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("template")
    ap.add_argument("dest")
    ap.add_argument("qtype", choices=["Q8_0", "Q4_0", "Q4_1"])
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    qtype = getattr(gguf.GGMLQuantizationType, a.qtype)
    r = gguf.GGUFReader(a.template)
    shape = SHAPES.get(a.shape)
    w = gguf.GGUFWriter(a.dest + ".tmp", "llama")
    # general.file_type: llama.cpp's LLAMA_FTYPE_MOSTLY_* for the type written.
    dims = {"general.file_type": {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[a.qtype]}
    if shape:
        dims |= {"llama.block_count": shape["layers"], "llama.embedding_length": shape["embd"],
                "llama.feed_forward_length": shape["ffn"], "llama.attention.head_count": shape["heads"],
                "llama.attention.head_count_kv": shape["kv_heads"],
                "llama.rope.dimension_count": shape["embd"] // shape["heads"]}
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = dims.get(key, f.contents())
        if key == "general.name" and shape:
            val = f"random {a.shape} ({a.qtype}, tokenizer of {val})"
        w.add_key_value(key, val, vtype, sub)
    rng = np.random.default_rng(a.seed)
    src = {t.name: t for t in r.tensors}
    if shape:
        vocab = src["token_embd.weight"].shape[-1]
        e, f_, hd = shape["embd"], shape["ffn"], shape["embd"] // shape["heads"]
        names = {"token_embd.weight": (vocab, e), "output_norm.weight": (e,)}
        for i in range(shape["layers"]):
            names.update({
                f"blk.{i}.attn_norm.weight": (e,), f"blk.{i}.ffn_norm.weight": (e,),
                f"blk.{i}.attn_q.weight": (e, e), f"blk.{i}.attn_k.weight": (shape["kv_heads"] * hd, e),
                f"blk.{i}.attn_v.weight": (shape["kv_heads"] * hd, e), f"blk.{i}.attn_output.weight": (e, e),
                f"blk.{i}.ffn_gate.weight": (f_, e), f"blk.{i}.ffn_up.weight": (f_, e), f"blk.{i}.ffn_down.weight": (e, f_),
            })
        tensors = ((n, lambda s=s: np.ones(s, np.float32) if len(s) == 1 else
                    (rng.standard_normal(s, dtype=np.float32) * 0.02)) for n, s in names.items())
    else:
        def load(t):
            data = np.asarray(t.data)
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                return data.astype(np.float32).reshape(list(reversed([int(x) for x in t.shape])))
            return gguf.quants.dequantize(data, t.tensor_type).reshape(list(reversed([int(x) for x in t.shape])))
        tensors = ((t.name, lambda t=t: load(t)) for t in r.tensors)
    for i, (name, make) in enumerate(tensors):
        arr = make()
        if arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
        if i % 20 == 0:
            print(f"{name} {arr.shape}", file=sys.stderr, flush=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(a.dest + ".tmp", a.dest)
    print(f"wrote {a.dest} ({os.path.getsize(a.dest) >> 20} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()

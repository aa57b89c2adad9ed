"""GGUF files (llama.cpp, Ollama, LM Studio) into MLX model folders.

A GGUF file is converted once into a folder mlx-lm loads like any model:
config.json from the file's metadata, the weights (renamed to the Hugging
Face names mlx-lm's model classes use), tokenizer.json and
tokenizer_config.json (with the chat template) from the file's tokenizer
metadata. The folder is named by a fingerprint of the file, written under a
temporary name and renamed when complete, so a killed conversion never looks
finished and later starts load it directly.

Weights: MLX reads Q4_0, Q4_1 and Q8_0 itself as its own quantized format
(group size 32) and F16/BF16/F32 as arrays. Other types (the K-quants most
Ollama downloads use, IQ types) are dequantized in numpy by the `gguf`
package. The tensors MLX reads stay packed on disk (a conversion costs about
the GGUF file's size); on the Linux CPU backend they become float32 in memory
at load (MLX's quantized CPU matmuls are far slower than float32 through
OpenBLAS) and the other types are stored as float32; elsewhere MLX's
quantized format is kept (a type MLX cannot read is re-quantized at the
nearest bit width).
"""

import hashlib
import json
import os
import shutil
import sys
import time
import uuid

import mlx.core as mx

# Bump when the output of a conversion changes: old folders are then ignored.
CONVERTER_VERSION = "2"

SUPPORTED = ("llama", "qwen2", "qwen3")


class GGUFError(Exception):
    """A GGUF file this converter cannot serve (architecture, tensor type)."""


def plan():
    """(dequantize, why): what this backend wants from quantized GGUF weights."""
    if mx.default_device() == mx.cpu:
        return True, ("dequantizing to float32: on the CPU backend MLX's quantized matmuls are far slower "
                      "than float32 through OpenBLAS")
    return False, f"keeping MLX's quantized format (group size 32) on {mx.default_device()}"


def find_gguf(path):
    """The .gguf file `path` names: the file itself, or the only one in a
    folder that is not already a model folder. None when it is neither."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(found) == 1:
            return os.path.join(path, found[0])
        if len(found) > 1:
            raise GGUFError(f"{path} holds several GGUF files ({', '.join(found)}): name one")
    return None


def fingerprint(path, dequantize):
    st = os.stat(path)
    h = hashlib.sha256(
        f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{dequantize}:{CONVERTER_VERSION}".encode()
    )
    return h.hexdigest()[:16]


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def prepare(path, cache_dir, dequantize, log=_stderr):
    """The converted folder for GGUF file `path` (converting it first when no
    finished conversion exists). Returns (folder, converted_now, seconds)."""
    # Named after the real file: an Ollama blob symlinked to a file already
    # converted reuses that conversion.
    name = os.path.splitext(os.path.basename(os.path.realpath(path)))[0]
    dest = os.path.join(cache_dir, f"{name}-{fingerprint(path, dequantize)}")
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest, False, 0.0
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        convert(path, tmp, dequantize, log)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            f.write(CONVERTER_VERSION)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.exists(os.path.join(dest, ".complete")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest, True, time.perf_counter() - t0


def _scalar(meta, key, default=None):
    v = meta.get(key)
    if v is None:
        return default
    if isinstance(v, mx.array):
        v = v.item()
    return v


def read(path):
    """(tensors, metadata, bits): tensors MLX cannot read come back
    dequantized to float32 through the `gguf` package, with the bit width
    their type had (`bits`: name -> bits, for re-quantizing)."""
    try:
        weights, meta = mx.load(path, return_metadata=True)
        return weights, meta, {}
    except Exception as e:
        mlx_error = e
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"MLX cannot read {path} ({mlx_error}) and the gguf package is not installed")
    reader = gguf.GGUFReader(path)
    weights, bits = {}, {}
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        try:
            data = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError:
            raise GGUFError(f"tensor {t.name} has type {qtype.name}, which nothing here can read")
        shape = [int(x) for x in reversed(t.shape.tolist())]
        weights[t.name] = mx.array(data.astype("float32").reshape(shape))
        digits = "".join(c for c in qtype.name.split("_")[0] if c.isdigit())
        if digits and qtype.name not in ("F16", "F32", "BF16", "F64"):
            bits[t.name] = int(digits)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        val = field.contents()
        meta[key] = val
    return weights, meta, bits


def _config(meta, weights):
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise GGUFError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    a = lambda k, d=None: _scalar(meta, f"{arch}.{k}", d)  # noqa: E731
    hidden = int(a("embedding_length"))
    heads = int(a("attention.head_count"))
    head_dim = int(a("attention.key_length", hidden // heads))
    tokens = meta["tokenizer.ggml.tokens"]
    eos = [int(_scalar(meta, k)) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if _scalar(meta, k) is not None]
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(a("block_count")),
        "intermediate_size": int(a("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(a("context_length", 4096)),
        "vocab_size": len(tokens),
        "tie_word_embeddings": "output.weight" not in weights,
        "eos_token_id": sorted(set(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None),
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
    }
    if arch == "qwen2":
        config["attention_bias"] = True
    return arch, config


# GGUF tensor names -> Hugging Face names (the layer part is filled in).
_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(name):
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 4 and parts[2] in _NAMES:
        return f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] in _TOP and len(parts) >= 2:
        return f"{_TOP[parts[0]]}.{'.'.join(parts[1:])}"
    return None


def unpermute_qk(w, n_head):
    """llama.cpp's converter interleaves the two rotary halves of each Q/K
    head (rows) for its RoPE; mlx-lm (like Hugging Face) expects them split.
    This undoes it on the output rows of a [out, in] matrix."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(path, dest, dequantize, log=_stderr, permute_qk=True):
    """Writes the MLX model folder for GGUF file `path` into `dest`.

    Tensors MLX reads as its own quantized format (Q4_0, Q4_1, Q8_0) are
    written packed as they came, whatever the backend: the folder costs about
    what the GGUF file does on disk. With `dequantize` (the CPU backend) the
    folder is marked so that `load` turns them into float32 in memory; the
    other types are written as float32. Without it (Metal, CUDA) the rest are
    quantized too, at the file's bit width (the nearest MLX has).
    `permute_qk=False` keeps llama.cpp's Q/K row order (wrong for mlx-lm:
    only for measuring what a mis-conversion does)."""
    t0 = time.perf_counter()
    weights, meta, file_bits = read(path)
    arch, config = _config(meta, weights)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    out, bits_seen, packed = {}, set(), 0
    names = sorted({k.rsplit(".", 1)[0] for k in weights})
    step = max(1, len(names) // 10)
    for i, base in enumerate(names):
        if i % step == 0 and i:
            log(f"pensieve gguf: converting {os.path.basename(path)}: {100 * i // len(names)}% ({i}/{len(names)} tensors)")
        w = weights.get(f"{base}.weight")
        target = hf_name(f"{base}.weight")
        if w is None or target is None:
            # A bias travels with its weight (below); anything else unknown is skipped.
            if w is not None:
                log(f"gguf: ignoring tensor {base}.weight")
            continue
        target = target[: -len(".weight")]
        qk = arch == "llama" and permute_qk and base.endswith((".attn_q", ".attn_k"))
        fix = (lambda a: unpermute_qk(a, n_head if base.endswith(".attn_q") else n_kv)) if qk else (lambda a: a)
        scales = weights.get(f"{base}.scales")
        if scales is not None:
            # Packed rows: the Q/K permutation moves whole rows of the packed
            # weight, its scales and its biases alike.
            biases = weights[f"{base}.biases"]
            bits_seen.add(w.shape[-1] * 32 // (scales.shape[-1] * 32))
            out[f"{target}.weight"], out[f"{target}.scales"], out[f"{target}.biases"] = fix(w), fix(scales), fix(biases)
            packed += 1
        else:
            if f"{base}.weight" in file_bits:
                bits_seen.add(file_bits[f"{base}.weight"])
            out[f"{target}.weight"] = fix(w.astype(mx.float32))
        if f"{base}.bias" in weights:
            out[f"{target}.bias"] = weights[f"{base}.bias"].astype(mx.float32)
        mx.eval([out[k] for k in out if k.startswith(f"{target}.")])
    if config["tie_word_embeddings"]:
        for k in ("weight", "scales", "biases"):
            out.pop(f"lm_head.{k}", None)
    # The bit width for anything (re-)quantized: the file's, the nearest MLX has.
    bits = min(bits_seen or {8}, key=lambda b: abs(b - 4))
    bits = min((2, 3, 4, 5, 6, 8), key=lambda b: abs(b - bits))
    if not dequantize:
        for k in [k for k in out if k.endswith(".weight")]:
            v, stem = out[k], k[: -len(".weight")]
            if f"{stem}.scales" not in out and v.ndim == 2 and v.shape[-1] % 32 == 0 and "norm" not in k:
                out[k], out[f"{stem}.scales"], out[f"{stem}.biases"] = mx.quantize(v, group_size=32, bits=bits)
                packed += 1
    if packed:
        # mlx-lm reads each packed tensor's own bit width from its shapes.
        config["quantization"] = {"group_size": 32, "bits": bits}
    os.makedirs(dest, exist_ok=True)
    mx.save_safetensors(os.path.join(dest, "model.safetensors"), out, metadata={"format": "mlx"})
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=1)
    _write_tokenizer(meta, arch, dest)
    gen = {k: _scalar(meta, f"general.sampling.{g}") for k, g in
           (("temperature", "temp"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"))}
    gen = {k: v for k, v in gen.items() if v is not None}
    if gen:
        with open(os.path.join(dest, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=1)
    with open(os.path.join(dest, MARKER), "w") as f:
        json.dump({"source": os.path.realpath(path), "seconds": time.perf_counter() - t0,
                   "dequantize_on_load": bool(dequantize and packed), "dequantized": bool(dequantize),
                   "types_read_by": "gguf" if file_bits else "mlx"}, f)


MARKER = "pensieve-gguf.json"


def load(folder, **kw):
    """mlx_lm.load for any model folder; a GGUF conversion made for the CPU
    backend gets its packed weights dequantized to float32 in memory."""
    import mlx_lm

    loaded = mlx_lm.load(folder, **kw)
    dequantize_if_marked(loaded[0], folder)
    return loaded


def unpack(q, scales, biases, group_size, bits):
    """float32 weights from MLX's affine packing: what mx.dequantize gives,
    4x faster on the CPU backend for the widths that divide 32 (elementwise
    shifts and masks instead of its per-element kernel)."""
    if 32 % bits:
        return mx.dequantize(q, scales, biases, group_size, bits).astype(mx.float32)
    shifts = mx.arange(32 // bits, dtype=mx.uint32) * bits
    v = ((q[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*q.shape[:-1], -1, group_size).astype(mx.float32)
    w = v * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return w.reshape(*q.shape[:-1], -1)


def dequantize_if_marked(model, folder):
    """Float32 weights for a model loaded from a conversion marked
    `dequantize_on_load`. Returns whether it did anything."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            marked = json.load(f).get("dequantize_on_load")
    except (OSError, ValueError):
        return False
    if not marked:
        return False
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = unpack(m.weight, m.scales, m.biases, m.group_size, m.bits)
            if isinstance(m, nn.QuantizedLinear):
                new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
                if "bias" in m:
                    new.bias = m.bias.astype(mx.float32)
            else:
                new = nn.Embedding(w.shape[0], w.shape[1])
            new.weight = w
            swaps.append((name, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return True


def _write_tokenizer(meta, arch, dest):
    """tokenizer.json and tokenizer_config.json from the file's tokenizer
    metadata, through transformers' GGUF tokenizer builders."""
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokens = list(meta["tokenizer.ggml.tokens"])
    d = {"tokenizer_type": meta.get("tokenizer.ggml.model"), "pre_tokenizer_type": meta.get("tokenizer.ggml.pre"),
         "tokens": tokens}
    for key, name in (("tokenizer.ggml.merges", "merges"), ("tokenizer.ggml.scores", "scores")):
        if key in meta:
            v = meta[key]
            d[name] = v.tolist() if isinstance(v, mx.array) else list(v)
    if "tokenizer.ggml.token_type" in meta:
        tt = meta["tokenizer.ggml.token_type"]
        d["token_type"] = tt.tolist() if isinstance(tt, mx.array) else list(tt)
    try:
        backend, _ = convert_gguf_tokenizer(arch, d)
    except Exception as e:
        raise GGUFError(f"cannot build this file's tokenizer ({d['tokenizer_type']!r}): {e}") from e
    if d.get("pre_tokenizer_type") == "smollm":
        # SmolLM's own tokenizer: single digits, then GPT-2's byte-level split.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    backend.save(os.path.join(dest, "tokenizer.json"))
    tok_name = lambda k: tokens[int(_scalar(meta, k))] if _scalar(meta, k) is not None else None  # noqa: E731
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok_name("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_name("tokenizer.ggml.eos_token_id"),
        "unk_token": tok_name("tokenizer.ggml.unknown_token_id"),
        "pad_token": tok_name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, f"{arch}.context_length", 4096)),
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    with open(os.path.join(dest, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def write(folder, out, qtype="F32"):
    """Writes MLX model folder `folder` (llama / qwen2 / qwen3, float weights,
    a byte-level BPE tokenizer.json) as a GGUF file the way llama.cpp's
    converter lays it out: its tensor names, Q/K rows permuted for llama,
    matrices in `qtype` (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0; norms and
    biases stay F32), and the
    tokenizer as gguf metadata. For tests and benchmarks: real GGUF files of
    any shape without a download."""
    import gguf
    import numpy as np

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    arch = config["model_type"]
    if arch not in SUPPORTED:
        raise GGUFError(f"cannot write architecture {arch!r}")
    weights = mx.load(os.path.join(folder, "model.safetensors"))
    w = gguf.GGUFWriter(out, arch)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    w.add_context_length(config.get("max_position_embeddings", 4096))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    qt = gguf.GGMLQuantizationType[qtype]
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}[qtype])
    _write_tokenizer_meta(w, folder)
    top = {v: k for k, v in _TOP.items()}
    names = {v: k for k, v in _NAMES.items()}
    for name, v in sorted(weights.items()):
        parts = name.split(".")
        if parts[0] == "model" and parts[1] == "layers":
            base = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}"
        else:
            base = top[".".join(parts[:-1])]
        a = np.array(v.astype(mx.float32))
        if arch == "llama" and base.endswith((".attn_q", ".attn_k")) and parts[-1] == "weight":
            n = heads if base.endswith(".attn_q") else kv
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        gname = f"{base}.{parts[-1]}"
        if a.ndim == 2 and qt != gguf.GGMLQuantizationType.F32 and "norm" not in base:
            if qt == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gname, a.astype(np.float16))
            else:
                w.add_tensor(gname, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_tokenizer_meta(w, folder):
    """A byte-level BPE tokenizer.json as llama.cpp's gpt2-model metadata."""
    with open(os.path.join(folder, "tokenizer.json")) as f:
        tj = json.load(f)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        tc = json.load(f)
    vocab = dict(tj["model"]["vocab"])
    special = {}
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        special[t["id"]] = t.get("special", False)
    tokens = [None] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if special.get(i) else (4 if i in special else 1) for i in range(len(tokens))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_token_merges(merges)
    index = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)):
        if tc.get(key) in index:
            add(index[tc[key]])
    w.add_add_bos_token(False)
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])


if __name__ == "__main__":
    # python python/pensieve_gguf.py FILE.gguf DEST [--keep-quantized] [--no-permute]
    # python python/pensieve_gguf.py write MODEL_FOLDER OUT.gguf [F32|F16|Q4_0|Q4_1|Q5_0|Q5_1|Q8_0]
    args = sys.argv[1:]
    t0 = time.perf_counter()
    if args[:1] == ["write"] and len(args) >= 3:
        write(args[1], args[2], *(args[3:4] or []))
        print(f"{args[2]} written in {time.perf_counter() - t0:.1f}s")
    elif len(args) >= 2:
        convert(args[0], args[1], "--keep-quantized" not in args, permute_qk="--no-permute" not in args)
        print(f"{args[1]} ready in {time.perf_counter() - t0:.1f}s")
    else:
        sys.exit("usage: pensieve_gguf.py FILE.gguf DEST [--keep-quantized] [--no-permute]\n"
                 "       pensieve_gguf.py write MODEL_FOLDER OUT.gguf [F32|F16|Q4_0|Q4_1|Q5_0|Q5_1|Q8_0]")

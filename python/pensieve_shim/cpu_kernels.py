"""The CPU path: pensieve's own kernels (src/kernels/, Rust) where MLX's CPU
backend is slow, as MLX primitives, so the model stays one MLX graph.

- Quantized linear layers and embeddings (MLX's affine 4- and 8-bit formats,
  any group size that is a multiple of 32: MLX-quantized models and GGUF
  Q4_0/Q4_1/Q8_0) are repacked once into the Rust side's blocks and stay
  quantized; their products run as integer dot products for decode and as
  dequantized tiles through OpenBLAS for prefill.
- `mx.fast.scaled_dot_product_attention` (what mlx-lm's models call) runs a
  fused attention with an online softmax for float32 inputs.
- mlx-lm's `swiglu` (the gated MLP's activation) runs vectorized.
- `mx.fast.rope` and `mx.fast.rms_norm` run as one kernel each: MLX's CPU
  backend builds them from ~15 and ~5 separate ops (rope alone was a third
  of a small model's decode step).

`pensieve_kernels` is registered by the binary (src/engine/py/kernels.rs);
`pensieve_mlx` is the extension build.rs compiles against the venv's mlx
(src/kernels/mlx_ops.cpp). Without either — or on Metal and CUDA, where
MLX's own kernels are the fast path — nothing here is used."""

import json
import sys
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

try:
    import pensieve_kernels as kernels
except ImportError:  # MLX used outside the pensieve binary
    kernels = None
try:
    import pensieve_mlx as ext
except ImportError:  # a venv pensieve's build did not make
    ext = None

_mlx_sdpa = mx.fast.scaled_dot_product_attention
_mlx_rope = mx.fast.rope
_mlx_rms_norm = mx.fast.rms_norm
_bound = False


def unavailable():
    """Why the kernels cannot run here, or None when they can."""
    if mx.default_device() != mx.cpu:
        return f"MLX runs on {mx.default_device()}: its own kernels are the fast path"
    if kernels is None:
        return "pensieve_kernels is not registered (MLX outside the pensieve binary)"
    if ext is None:
        return "the pensieve_mlx extension is not in this venv (pensieve's build makes it in ./.venv)"
    return None


def _bind():
    global _bound
    if not _bound:
        ext.bind(kernels.table_address())
        _bound = True


class QuantLinear(nn.Module):
    """A quantized linear layer whose weights the Rust side holds."""

    def __init__(self, matrix, bias=None):
        super().__init__()
        self._matrix = matrix
        if bias is not None:
            self.bias = bias.astype(mx.float32)

    def __call__(self, x):
        m = self._matrix
        y = ext.qmatmul(x.astype(mx.float32), m.handle, m.rows, m.cols)
        return y + self.bias if "bias" in self else y


class QuantEmbedding(nn.Module):
    """A quantized embedding (and, tied, the head) whose weights the Rust side holds."""

    def __init__(self, matrix):
        super().__init__()
        self._matrix = matrix

    def __call__(self, ids):
        return ext.gather(ids, self._matrix.handle, self._matrix.cols)

    def as_linear(self, x):
        m = self._matrix
        return ext.qmatmul(x.astype(mx.float32), m.handle, m.rows, m.cols)


def _rope_args(rope):
    """(dims, traditional, base, scale, freqs) of a rope module whose call is
    exactly one mx.fast.rope, or None (the fused q/k/v product then stays off)."""
    if type(rope) is nn.RoPE:
        return rope.dims, rope.traditional, rope.base, rope.scale, None
    freqs = getattr(rope, "_freqs", None)
    if type(rope).__name__ == "Llama3RoPE" and isinstance(freqs, mx.array):
        return rope.dims, rope.traditional, None, 1.0, freqs.astype(mx.float32)
    return None


class FusedAttention(nn.Module):
    """mlx-lm's llama/qwen2 attention with q, k and v as one product over
    their stacked rows, rope and the head layout applied in the same kernel,
    and the attention written in the layout the output projection reads:
    four graph nodes where mlx-lm's has fifteen."""

    def __init__(self, attn, matrix, rope, bias):
        super().__init__()
        self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
        self.head_dim = attn.q_proj.weight.shape[0] // attn.n_heads
        self.scale = attn.scale
        self._matrix, self._rope = matrix, rope
        if bias is not None:
            self.qkv_bias = bias
        self.o_proj = attn.o_proj

    def __call__(self, x, mask=None, cache=None, norm=None, residual=None):
        """mlx-lm's attention; with `norm` (an RMSNorm) it normalizes `x`
        first, and with `residual` adds it to the output (FusedBlock)."""
        B, L, _ = x.shape
        m = self._matrix
        dims, traditional, base, scale, freqs = self._rope
        offset = cache.offset if cache is not None else 0
        bias = self.qkv_bias if "qkv_bias" in self else None
        nw, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
        q, k, v = ext.qkv_rope(x.astype(mx.float32), m.handle, m.rows, m.cols, self.n_heads, self.n_kv_heads,
                               self.head_dim, dims, traditional, base, scale, offset, freqs, bias, nw, eps)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if not hasattr(cache, "bits") and k.dtype == v.dtype == mx.float32 and (
            mask is None or isinstance(mask, mx.array) or mask == "causal"
        ):
            out = ext.attention(q, k, v, self.scale, mask, True)
        else:  # a quantized KV cache: mlx-lm's own attention for it
            from mlx_lm.models.base import scaled_dot_product_attention

            out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
            out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return _project(self.o_proj, out, residual)


class FusedMLP(nn.Module):
    """A gated MLP (silu(gate(x)) * up(x), then down) with gate and up as one
    product over their stacked rows and the activation in the same kernel."""

    def __init__(self, mlp, matrix):
        super().__init__()
        self._matrix = matrix
        self.down_proj = mlp.down_proj

    def __call__(self, x, norm=None, residual=None):
        m = self._matrix
        nw, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
        return _project(self.down_proj, ext.gate_up_silu(x.astype(mx.float32), m.handle, m.rows, m.cols, nw, eps), residual)


def _project(proj, x, residual):
    """`residual + proj(x)`, as one node when `proj` is a kernels layer."""
    if residual is None:
        return proj(x)
    if isinstance(proj, QuantLinear) and "bias" not in proj and residual.dtype == mx.float32:
        m = proj._matrix
        return ext.qmatmul_add(x, m.handle, m.rows, m.cols, residual)
    return residual + proj(x)


class FusedBlock(nn.Module):
    """mlx-lm's llama/qwen2 decoder layer over a FusedAttention and a
    FusedMLP, with each RMSNorm done inside the products that read it and
    each skip connection added inside the projection before it: a layer is
    the attention's four nodes, the KV cache's update, and two for the MLP."""

    def __init__(self, block):
        super().__init__()
        self.self_attn, self.mlp = block.self_attn, block.mlp
        self.input_layernorm, self.post_attention_layernorm = block.input_layernorm, block.post_attention_layernorm
        # What the model reads of its layers (use_sliding, args, ...).
        for k, v in vars(block).items():
            if not k.startswith("_"):
                setattr(self, k, v)

    def __call__(self, x, mask=None, cache=None):
        h = self.self_attn(x, mask, cache, norm=self.input_layernorm, residual=x)
        return self.mlp(h, norm=self.post_attention_layernorm, residual=h)


def _stacked(mods):
    """One Rust-side matrix of several quantized layers' rows (same input,
    same format), or None."""
    if not all(isinstance(m, nn.QuantizedLinear) for m in mods):
        return None
    first = mods[0]
    key = lambda m: (m.bits, m.group_size, getattr(m, "mode", "affine"), m.weight.shape[1])  # noqa: E731
    if any(key(m) != key(first) for m in mods):
        return None
    if any("bias" in m for m in mods) and not all("bias" in m for m in mods):
        return None
    cat = SimpleNamespace(
        bits=first.bits, group_size=first.group_size, mode=getattr(first, "mode", "affine"),
        **{name: mx.concatenate([getattr(m, name) for m in mods]) for name in ("weight", "scales", "biases")},
    )
    try:
        matrix, _ = _matrix(cat)
    except ValueError:
        return None
    return matrix


def _fusions(model):
    """The llama/qwen2 attention and MLP modules that can run fused: {module
    name: replacement builder}, and the names of the projections they absorb."""
    import os

    if os.environ.get("PENSIEVE_CPU_FUSE", "on") == "off":
        return {}, set()
    try:
        from mlx_lm.models import llama, qwen2
    except ImportError:
        return {}, set()
    attentions = (llama.Attention, qwen2.Attention)
    mlps = (llama.MLP, qwen2.MLP)
    out, absorbed = {}, set()
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if type(mod) in attentions:
            rope = _rope_args(mod.rope)
            projs = [mod.q_proj, mod.k_proj, mod.v_proj]
            if rope is None or projs[0].weight.shape[0] % mod.n_heads:
                continue
            matrix = _stacked(projs)
            if matrix is None:
                continue
            bias = mx.concatenate([p.bias for p in projs]).astype(mx.float32) if "bias" in projs[0] else None
            out[name] = (lambda mod=mod, matrix=matrix, rope=rope, bias=bias: FusedAttention(mod, matrix, rope, bias), matrix)
            absorbed |= {prefix + n for n in ("q_proj", "k_proj", "v_proj")}
        elif type(mod) in mlps:
            projs = [mod.gate_proj, mod.up_proj]
            if "bias" in projs[0] or "bias" in projs[1]:
                continue
            matrix = _stacked(projs)
            if matrix is None:
                continue
            out[name] = (lambda mod=mod, matrix=matrix: FusedMLP(mod, matrix), matrix)
            absorbed |= {prefix + n for n in ("gate_proj", "up_proj")}
    return out, absorbed


def _fusable_block(mod):
    """A llama/qwen2 decoder layer whose attention and MLP run fused and
    whose norms are plain RMSNorms: FusedBlock computes exactly what it does."""
    try:
        from mlx_lm.models import llama, qwen2
    except ImportError:
        return False
    return (
        type(mod) in (llama.TransformerBlock, qwen2.TransformerBlock)
        and isinstance(mod.self_attn, FusedAttention)
        and isinstance(mod.mlp, FusedMLP)
        and type(mod.input_layernorm) is nn.RMSNorm
        and type(mod.post_attention_layernorm) is nn.RMSNorm
    )


def _matrix(m):
    """The Rust-side matrix for a quantized module, or why it cannot be one."""
    mode = getattr(m, "mode", "affine")
    if mode != "affine":
        return None, f"{mode} quantization"
    if m.bits not in (4, 8) or m.group_size % 32:
        return None, f"{m.bits}-bit, group size {m.group_size}"
    w = m.weight
    rows, cols = w.shape[0], w.shape[1] * 32 // m.bits
    scales = m.scales.astype(mx.float32)
    biases = m.biases.astype(mx.float32)
    mx.eval(w, scales, biases)
    return kernels.QuantMatrix(w, scales, biases, rows, cols, m.bits, m.group_size), None


def _sdpa(q, k, v, *, scale, mask=None, sinks=None, stream=None, **kw):
    """mx.fast.scaled_dot_product_attention, through the fused kernel where
    it applies (float32, 4-D, no sinks; no mask, causal, or an array mask)."""
    if (
        sinks is None
        and not kw
        and stream is None
        and q.ndim == 4
        and q.dtype == k.dtype == v.dtype == mx.float32
        and (mask is None or isinstance(mask, mx.array) or mask == "causal")
    ):
        return ext.attention(q, k, v, scale, mask)
    return _mlx_sdpa(q, k, v, scale=scale, mask=mask, sinks=sinks, stream=stream, **kw)


def _rope(a, dims, *, traditional, base, scale, offset, freqs=None, stream=None):
    """mx.fast.rope through the one-pass kernel for float32 inputs."""
    if stream is None and a.dtype == mx.float32 and a.ndim >= 3 and (freqs is None or freqs.dtype == mx.float32):
        return ext.rope(a, dims, traditional, base, scale, offset, freqs)
    return _mlx_rope(a, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs, stream=stream)


def _rms_norm(x, weight, eps, *, stream=None):
    """mx.fast.rms_norm through the one-pass kernel for float32 inputs."""
    if stream is None and x.dtype == mx.float32 and x.ndim >= 1 and (
        weight is None or (weight.dtype == mx.float32 and weight.shape == (x.shape[-1],))
    ):
        return ext.rms_norm(x, weight, eps)
    return _mlx_rms_norm(x, weight, eps, stream=stream)


def _swiglu(gate, x):
    """mlx-lm's swiglu (silu(gate) * x) through the vectorized kernel."""
    if gate.dtype == x.dtype == mx.float32 and gate.shape == x.shape:
        return ext.silu_mul(gate, x)
    return _mlx_swiglu(gate, x)


try:
    from mlx_lm.models import activations as _activations

    _mlx_swiglu = _activations.swiglu
except ImportError:  # an mlx-lm without it: nothing to replace
    _mlx_swiglu = None


def _patch(on):
    """Routes mx.fast.scaled_dot_product_attention, rope, rms_norm and swiglu to the
    kernels (on) or back to MLX (off): process-wide, as install leaves them."""
    mx.fast.scaled_dot_product_attention = _sdpa if on else _mlx_sdpa
    mx.fast.rope = _rope if on else _mlx_rope
    mx.fast.rms_norm = _rms_norm if on else _mlx_rms_norm
    if _mlx_swiglu is None:
        return
    for name, mod in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and getattr(mod, "swiglu", None) in (_mlx_swiglu, _swiglu):
            mod.swiglu = _swiglu if on else _mlx_swiglu


def install(model):
    """Puts the kernels into `model` (in place). Returns a summary: the
    instruction set, how many layers moved, the bytes the Rust side now
    holds, and what stayed with MLX (and why)."""
    why = unavailable()
    if why:
        return {"used": False, "why": why}
    try:
        _bind()
    except RuntimeError as e:  # an extension built for another pensieve
        return {"used": False, "why": str(e)}
    fusions, absorbed = _fusions(model)
    swaps, held, kept = [], 0, {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or name in absorbed:
            continue
        try:
            matrix, reason = _matrix(m)
        except ValueError as e:  # a layout the kernels refuse: MLX keeps the layer
            matrix, reason = None, str(e)
        if matrix is None:
            kept[reason] = kept.get(reason, 0) + 1
            continue
        held += matrix.nbytes
        if isinstance(m, nn.QuantizedLinear):
            swaps.append((name, QuantLinear(matrix, m.bias if "bias" in m else None)))
        else:
            swaps.append((name, QuantEmbedding(matrix)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    if fusions:
        # Built after the swap above, so their o_proj / down_proj are the
        # kernels' layers; the MLX q/k/v and gate/up go with the old modules.
        fused = [(name, build()) for name, (build, _) in fusions.items()]
        held += sum(matrix.nbytes for _, matrix in fusions.values())
        model.update_modules(tree_unflatten(fused))
        blocks = [(name, FusedBlock(mod)) for name, mod in model.named_modules() if _fusable_block(mod)]
        if blocks:
            model.update_modules(tree_unflatten(blocks))
    if swaps or fusions:
        # The rest of a quantized model (norms, the odd unquantized layer) in
        # float32: the kernels take float32, and it is small. An unquantized
        # model keeps its dtype (a bfloat16 one would double in memory).
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    _patch(True)
    # The MLX copies of the weights are gone; drop them from MLX's buffer cache.
    mx.clear_cache()
    return {
        "used": True,
        "isa": kernels.isa(),
        "threads": kernels.threads(),
        "layers": len(swaps) + len(absorbed),
        "fused": len(fusions),
        "fused_layers": sum(isinstance(m, FusedBlock) for _, m in model.named_modules()),
        "bytes": held,
        "kept": kept,
    }


def check_ops():
    """The one-pass rope and rms_norm against MLX's own, on the shapes and
    arguments models call them with. Returns {case: largest |difference|
    relative to the largest |value|}."""
    key = mx.random.key(7)
    out = {}

    def rel(a, b):
        return float((mx.max(mx.abs(a - b)) / mx.maximum(mx.max(mx.abs(b)), 1e-30)).item())

    cases = [
        # (name, shape, dims, traditional, base, scale, offset, freqs)
        ("decode", (1, 9, 1, 64), 64, False, 10000.0, 1.0, 37, None),
        ("prefill strided", (2, 40, 9, 64), 64, False, 100000.0, 1.0, 0, None),
        ("traditional", (1, 4, 7, 32), 32, True, 10000.0, 1.0, 5, None),
        ("partial", (1, 2, 5, 128), 64, False, 10000.0, 0.5, 3, None),
        ("3-d", (3, 6, 64), 64, False, 10000.0, 1.0, 11, None),
        ("offsets per row", (3, 4, 2, 64), 64, False, 10000.0, 1.0, mx.array([0, 17, 4095]), None),
        ("freqs", (1, 4, 3, 64), 64, False, None, 1.0, 100, 1.0 + mx.arange(32, dtype=mx.float32) ** 2),
    ]
    for name, shape, dims, trad, base, scale, offset, freqs in cases:
        key, k = mx.random.split(key)
        x = mx.random.normal(shape, key=k)
        if name == "prefill strided":  # [B, L, H, D] viewed as [B, H, L, D], as attention passes queries
            x = x.transpose(0, 2, 1, 3)
        args = dict(traditional=trad, base=base, scale=scale, offset=offset, freqs=freqs)
        out[f"rope {name}"] = rel(_rope(x, dims, **args), _mlx_rope(x, dims, **args))
    for name, shape, weighted in [("decode", (1, 1, 576), True), ("prefill", (1, 300, 2048), True), ("no weight", (4, 96), False)]:
        key, k = mx.random.split(key)
        x = mx.random.normal(shape, key=k) * 3
        w = mx.random.normal((shape[-1],), key=k) if weighted else None
        out[f"rms_norm {name}"] = rel(_rms_norm(x, w, 1e-5), _mlx_rms_norm(x, w, 1e-5))
    return out


def compare(model_path, prompts, steps):
    """The kernels against MLX's own CPU ops on one model folder: for each
    prompt (text, or token ids), the logits after prefill and after each of `steps`
    decode steps fed the reference's greedy tokens. Returns, per prompt, the
    largest |logit difference| and the logit range at prefill and over the
    decode steps, and the reference's and the kernels' greedy tokens."""
    import pensieve_gguf
    from mlx_lm.models.cache import make_prompt_cache

    why = unavailable()
    if why:
        raise RuntimeError(why)

    def run(model, tokens, feed):
        cache = make_prompt_cache(model)
        out = []
        logits = model(mx.array([tokens]), cache=cache)[0, -1]
        out.append(logits)
        for t in feed:
            out.append(model(mx.array([[t]]), cache=cache)[0, -1])
        mx.eval(out)
        return out

    _patch(False)
    reference, tokenizer = pensieve_gguf.load(model_path)[:2]
    prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    refs = []
    for tokens in prompts:
        # Greedy continuation by the reference, then its logits along it.
        cache = make_prompt_cache(reference)
        logits = reference(mx.array([tokens]), cache=cache)[0, -1]
        greedy = []
        for _ in range(steps):
            t = int(mx.argmax(logits).item())
            greedy.append(t)
            logits = reference(mx.array([[t]]), cache=cache)[0, -1]
        refs.append((greedy, run(reference, tokens, greedy[:-1] if greedy else [])))
    del reference
    import mlx_lm

    fast = mlx_lm.load(model_path)[0]
    info = install(fast)
    results = []
    for tokens, (greedy, ref) in zip(prompts, refs):
        got = run(fast, tokens, greedy[:-1] if greedy else [])
        diffs = [float(mx.max(mx.abs(a - b)).item()) for a, b in zip(ref, got)]
        ranges = [float((mx.max(a) - mx.min(a)).item()) for a in ref]
        results.append({
            "prompt_tokens": len(tokens),
            "prefill_diff": diffs[0],
            "prefill_range": ranges[0],
            "decode_diff": max(diffs[1:], default=0.0),
            "decode_range": min(ranges[1:], default=0.0),
            "reference_greedy": [int(mx.argmax(a).item()) for a in ref],
            "kernels_greedy": [int(mx.argmax(a).item()) for a in got],
        })
    return json.dumps({"kernels": info, "prompts": results, "ops": check_ops()})

"""The CPU path: pensieve's own kernels (src/kernels/, Rust) where MLX's CPU
backend is slow, as MLX primitives, so the model stays one MLX graph.

- Quantized linear layers and embeddings (MLX's affine 4- and 8-bit formats,
  any group size that is a multiple of 32: MLX-quantized models and GGUF
  Q4_0/Q4_1/Q8_0) are repacked once into the Rust side's blocks and stay
  quantized; their products run as integer dot products for decode and as
  dequantized tiles through OpenBLAS for prefill.
- `mx.fast.scaled_dot_product_attention` (what mlx-lm's models call) runs a
  fused attention with an online softmax for float32 inputs.

`pensieve_kernels` is registered by the binary (src/engine/py/kernels.rs);
`pensieve_mlx` is the extension build.rs compiles against the venv's mlx
(src/kernels/mlx_ops.cpp). Without either — or on Metal and CUDA, where
MLX's own kernels are the fast path — nothing here is used."""

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


def install(model):
    """Puts the kernels into `model` (in place). Returns a summary: the
    instruction set, how many layers moved, the bytes the Rust side now
    holds, and what stayed with MLX (and why)."""
    why = unavailable()
    if why:
        return {"used": False, "why": why}
    _bind()
    swaps, held, kept = [], 0, {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        matrix, reason = _matrix(m)
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
    # The rest of the model (norms, anything unquantized) in float32: MLX's
    # CPU backend is fast for nothing else, and the kernels take float32.
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    mx.fast.scaled_dot_product_attention = _sdpa
    # The MLX copies of the weights are gone; drop them from MLX's buffer cache.
    mx.clear_cache()
    return {
        "used": True,
        "isa": kernels.isa(),
        "threads": kernels.threads(),
        "layers": len(swaps),
        "bytes": held,
        "kept": kept,
    }

"""The model: its forward passes as the engine runs them (the head on chosen
positions only, where that computes exactly what the full pass does), and the
probes run at load that decide how it is served."""

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import pensieve_gguf  # registered by the Rust side (src/engine/py.rs), or python/ on sys.path


def forward_hidden(model, head, x, cache):
    """The forward pass up to the head when the head is split off."""
    if head is not None:
        return model.model(x, cache=cache)
    return model(x, cache=cache)


def last_logits(model, head, x, cache, last):
    """Logits at position `last[i]` of each row: the head (a vocabulary-
    sized matmul) runs on those positions only, where the model allows."""
    rows, cols = mx.arange(x.shape[0]), mx.array(last)
    if head is not None:
        h = model.model(x, cache=cache)
        return head(h[rows, cols][:, None, :])[:, 0, :]
    return model(x, cache=cache)[rows, cols]


def can_batch(model):
    """Runs what batching does on a tiny probe — two prompts of different
    lengths prefilled together right-padded, then a decode step on their
    merged cache joined by a third — and says whether the model takes it
    (some attention implementations cannot use batch masks)."""
    if not all(hasattr(c, "merge") for c in make_prompt_cache(model)):
        return False
    try:
        caches = [make_prompt_cache(model) for _ in range(2)]
        group = [layer[0].merge(list(layer)) for layer in zip(*caches)]
        for c in group:
            c.prepare(lengths=[3, 5], right_padding=[2, 0])
        model(mx.array([[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]), cache=group)
        for c in group:
            c.finalize()
        third = make_prompt_cache(model)
        model(mx.array([[4, 5]]), cache=third)
        for ca, cb in zip(group, [c.merge([c]) for c in third]):
            ca.extend(cb)
        mx.eval(model(mx.array([[6], [7], [8]]), cache=group))
        return True
    except Exception:
        return False


def find_head(model):
    """The model's output head, if running `model.model` and then the head
    on chosen positions computes exactly what `model(...)` does (checked
    on a probe; models with extra output transforms fail it and keep the
    full forward pass)."""
    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        return None
    heads = []
    if hasattr(model, "lm_head"):
        heads.append(model.lm_head)
    emb = getattr(inner, "embed_tokens", None)
    if emb is not None and hasattr(emb, "as_linear"):
        heads.append(emb.as_linear)
    try:
        x = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
        full = model(x, cache=make_prompt_cache(model))[:, -1, :]
        h = inner(x, cache=make_prompt_cache(model))[:, -1:, :]
        for head in heads:
            fast = head(h)[:, -1, :]
            if fast.shape == full.shape and mx.allclose(fast, full, rtol=1e-4, atol=1e-4).item():
                return head
    except Exception:
        pass
    return None


_forward_models = {}


def forward_logits(model_path, tokens):
    """Logits of one forward pass (float32, flattened): a numerical check."""
    if model_path not in _forward_models:
        _forward_models[model_path] = pensieve_gguf.load(model_path)[0]
    out = _forward_models[model_path](mx.array([tokens]))
    return out.astype(mx.float32).reshape(-1).tolist()

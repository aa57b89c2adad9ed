"""Sampling: per-request samplers that never touch MLX's global random state
(and a guard that restores it), the logits processors that force tokens,
the sampling defaults a model ships, and the test hooks that break them."""

import json
import os

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def make_sampler(temperature, top_p, top_k, seed, min_p=0.0):
    """One request's sampler. Greedy requests share one object so that the
    decode step can sample the whole batch in one call.

    Every sampled request draws from its own key (its `seed`, or fresh
    entropy), never from MLX's global random state: what one request does to
    that state cannot change another's draws. A `top_k` at or above the
    vocabulary keeps every token (it is no restriction), as does `top_p` 1."""
    if temperature <= 0.0:
        return greedy
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    state = {"key": mx.random.key(seed)}
    inv_temp = 1.0 / temperature

    def sample(logprobs):
        if top_k and 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p and 0.0 < min_p <= 1.0:
            logprobs = apply_min_p(logprobs, min_p)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


class RandomStateGuard:
    """Restores MLX's global random state if sampling raises.

    mlx-lm's compiled samplers take the global state as an implicit input and
    output; one that raises while it is being traced leaves a placeholder
    array in the state, and every later draw from it fails ("eval an array
    without a primitive") until restart. The state is one uint32 pair that
    `mx.random.seed` can set exactly, so it is saved before each sampling call
    and put back on any exception."""

    def __enter__(self):
        # The array itself, not its value: reading it here would wait for
        # the pipelined previous step whenever a compiled sampler wrote it.
        self.saved = mx.random.state[0]
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            try:
                a, b = self.saved.tolist()
                mx.random.seed((int(a) << 32) | int(b))
            except Exception:
                pass  # it was broken before this call: the health probe reports it
        return False


def sampler_raising_after(sampler, n):
    """Test hook (fault injection): `sampler`, raising once it has drawn `n`
    tokens (in a batched step: after every sequence's processors ran)."""
    drawn = [0]

    def sample(logprobs):
        drawn[0] += 1
        if drawn[0] > n:
            raise RuntimeError(f"injected sampler fault after {n} tokens (test hook)")
        return sampler(logprobs)

    return sample


def raising_sampler(logprobs):
    """Test hook (fault injection): a sampler that raises while a compiled,
    random-state-capturing function is being traced (the top_k bug's shape)."""
    from functools import partial

    @partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
    def broken(x):
        mx.random.categorical(x)
        raise RuntimeError("injected fault inside the sampler (test hook)")

    return broken(logprobs)


def check_sampling():
    """What every sampled request needs, run on a tiny input: a draw from the
    global random state and the top-k / top-p samplers. Returns None when it
    works, else the error text (the engine then reports itself unhealthy)."""
    try:
        logprobs = mx.log(mx.softmax(mx.arange(8, dtype=mx.float32)[None, :], axis=-1))
        mx.eval(
            mx.random.categorical(logprobs),
            make_sampler(1.0, 0.9, 4, None, 0.05)(logprobs),
        )
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]


def poison_random_state():
    """Test hook (fault injection): what a sampler that raised mid-trace did
    to the global random state before the guard existed, done outside it."""
    try:
        raising_sampler(mx.zeros((1, 4)))
    except RuntimeError:
        pass


def only_token(logits, token):
    """Logits that allow exactly one token (the forcing processors' mask)."""
    allowed = mx.arange(logits.shape[-1]) == token
    return mx.where(allowed, mx.zeros_like(logits), mx.full(logits.shape, -float("inf"), dtype=logits.dtype))


class ThinkingBudget:
    """Logits processor: once a thinking block has run `budget` tokens, force
    the end-of-thinking token (single-token markers only)."""

    def __init__(self, tokenizer, budget):
        self.start = tokenizer.think_start_tokens
        self.end_id = tokenizer.think_end_id if len(tokenizer.think_end_tokens or ()) == 1 else None
        self.budget = max(1, int(budget))

    def __call__(self, tokens, logits):
        if self.end_id is None or not self.start:
            return logits
        toks = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        toks = toks[0] if toks and isinstance(toks[0], list) else toks
        start = -1
        for i in range(len(toks) - len(self.start), -1, -1):
            if tuple(toks[i : i + len(self.start)]) == tuple(self.start):
                start = i
                break
        if start == -1 or self.end_id in toks[start:]:
            return logits
        if len(toks) - start - len(self.start) < self.budget:
            return logits
        return only_token(logits, self.end_id)


def think_end(tk):
    # A property in some mlx-lm releases, a method in others.
    end = tk.think_end
    return end() if callable(end) else end


class ForceTokens:
    """Logits processor: the first generated tokens must be `tokens`. Which
    one is due follows from the context's length (the prompt's `start`
    tokens, then one per generated token), never from a call count, so a
    step that is run again after a failure forces the same token."""

    def __init__(self, tokens, start):
        self.tokens = tokens
        self.start = start

    def __call__(self, context, logits):
        i = len(context) - self.start
        if not 0 <= i < len(self.tokens):
            return logits
        return only_token(logits, self.tokens[i])


# How long a waiting prompt may be passed over by shorter ones before it is

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")


def sampling_defaults(model, opts):
    """{key: {"value", "source"}} for requests that send no sampling values:
    the model's own generation_config.json (greedy if it says do_sample:
    false), a built-in's model-card recommendation, then the server's flags."""
    out = {}
    gen_path = os.path.join(model, "generation_config.json") if os.path.isdir(model) else None
    if gen_path and os.path.exists(gen_path):
        try:
            with open(gen_path) as f:
                gen = json.load(f)
        except (OSError, ValueError):
            gen = {}
        for k in SAMPLING_KEYS:
            if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool):
                out[k] = {"value": gen[k], "source": "generation_config.json"}
        if gen.get("do_sample") is False:
            out["temperature"] = {"value": 0.0, "source": "generation_config.json (do_sample: false)"}
    for k, v in (opts.get("model_sampling") or {}).items():
        if k in SAMPLING_KEYS and k not in out and v is not None:
            out[k] = {"value": v, "source": "model card"}
    for k, v in (opts.get("sampling_flags") or {}).items():
        if k in SAMPLING_KEYS and v is not None:
            out[k] = {"value": v, "source": "--" + k.replace("_", "-")}
    return out


"""pensieve's MLX shim: every call into MLX / mlx-lm lives here.

The Rust binary embeds this file (include_str!) and drives it from exactly one
engine thread. Nothing here starts threads, sockets or servers: Rust owns the
request path, this module owns the model, the tokenizer, the scheduler
(continuous batching over mlx-lm's model and KV caches) and the prompt
(prefix) cache.

Data crosses the boundary as plain Python values (ints, strs, tuples) or JSON
strings, so the Rust side never holds Python objects outside its GIL scope.
"""

import copy
import hashlib
import json
import re
import shutil
import os
import stat
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

import mlx_lm
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import (
    KVCache,
    LRUPromptCache,
    TokenBuffer,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.utils import maybe_set_recommended_wired_limit
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

import pensieve_gguf  # registered by the Rust side (src/engine/py.rs), or python/ on sys.path

DEMO_MODEL_VERSION = "demo-v1"


def _leave_signals_to_rust():
    """SIGINT belongs to the Rust side (graceful drain). Python's own handler,
    if installed, would raise KeyboardInterrupt inside a generation step on
    the engine thread (Python's "main" thread). Ignoring it here, before the
    server registers its handler (which chains to this one), keeps Python out."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


_leave_signals_to_rust()


class ModelLoadError(Exception):
    """Raised when --model does not name a loadable model."""


class InvalidPrompt(Exception):
    """The request cannot run as asked (e.g. the prompt leaves no room in the context): a client error."""


def _greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def make_sampler(temperature, top_p, top_k, seed, min_p=0.0):
    """One request's sampler. Greedy requests share one object so that the
    decode step can sample the whole batch in one call.

    Every sampled request draws from its own key (its `seed`, or fresh
    entropy), never from MLX's global random state: what one request does to
    that state cannot change another's draws. A `top_k` at or above the
    vocabulary keeps every token (it is no restriction), as does `top_p` 1."""
    if temperature <= 0.0:
        return _greedy
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


class _RandomStateGuard:
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


def _sampler_raising_after(sampler, n):
    """Test hook (fault injection): `sampler`, raising once it has drawn `n`
    tokens (in a batched step: after every sequence's processors ran)."""
    drawn = [0]

    def sample(logprobs):
        drawn[0] += 1
        if drawn[0] > n:
            raise RuntimeError(f"injected sampler fault after {n} tokens (test hook)")
        return sampler(logprobs)

    return sample


def _raising_sampler(logprobs):
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


def _poison_random_state():
    """Test hook (fault injection): what a sampler that raised mid-trace did
    to the global random state before the guard existed, done outside it."""
    try:
        _raising_sampler(mx.zeros((1, 4)))
    except RuntimeError:
        pass


class Splitter:
    """Splits one request's decoded text into ("text" | "thinking" | "tool", str)
    pieces, using the model family's markers (from mlx-lm's tokenizer
    wrapper) and its tool parser. Markers may arrive split across tokens, so
    a tail that could still become a marker is held back.

    A tool call body that does not parse is given back as plain text: output
    that merely looks like a call never fails the request.
    """

    def __init__(self, tool_start=None, tool_end=None, parse_tool=None, tools=None,
                 think_start=None, think_end=None, state="text", show_thinking=False):
        self.tool_start, self.tool_end = tool_start or None, tool_end
        self.parse_tool, self.tools = parse_tool, tools
        self.think_start, self.think_end = think_start or None, think_end or None
        self.state = state
        self.show_thinking = show_thinking
        self.buf = ""
        self.tool_body = ""
        self.calls = 0

    def _markers(self):
        if self.state == "text":
            # A stray end-of-thinking marker in the answer is a control token,
            # not text: it is dropped.
            return [m for m in (self.tool_start if self.parse_tool else None, self.think_start, self.think_end) if m]
        if self.state == "thinking":
            return [self.think_end] if self.think_end else []
        return [self.tool_end] if self.tool_end else []

    def feed(self, text):
        self.buf += text
        out = []
        while True:
            markers = self._markers()
            hits = [(self.buf.find(m), m) for m in markers if m in self.buf]
            if not hits:
                keep = self._partial(markers)
                self._emit(out, self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            pos, marker = min(hits)
            self._emit(out, self.buf[:pos])
            self.buf = self.buf[pos + len(marker):]
            self._transition(out, marker)

    def finish(self):
        out = []
        self._emit(out, self.buf)
        self.buf = ""
        if self.state == "tool":
            # Cut off (max_tokens) or a format without an end marker.
            self._close_tool(out, terminated=not self.tool_end)
        return out

    def _partial(self, markers):
        best = 0
        for m in markers:
            for n in range(min(len(m) - 1, len(self.buf)), best, -1):
                if m.startswith(self.buf[-n:]):
                    best = n
                    break
        return best

    def _emit(self, out, text):
        if not text:
            return
        if self.state == "tool":
            self.tool_body += text
        elif self.state == "thinking":
            if self.show_thinking:
                out.append(("thinking", text))
        else:
            out.append(("text", text))

    def _transition(self, out, marker):
        if self.state == "text" and marker == self.tool_start:
            self.state, self.tool_body = "tool", ""
        elif self.state == "text" and marker == self.think_end:
            pass
        elif self.state == "text":
            self.state = "thinking"
        elif self.state == "thinking":
            self.state = "text"
        else:
            self._close_tool(out, terminated=True)

    def _close_tool(self, out, terminated):
        body, self.tool_body, self.state = self.tool_body, "", "text"
        calls = None
        if terminated:
            try:
                parsed = self.parse_tool(body, self.tools)
                calls = parsed if isinstance(parsed, list) else [parsed]
                calls = [
                    {"name": c["name"], "arguments": _as_object(c.get("arguments", {}))}
                    for c in calls
                ]
                if not all(isinstance(c["name"], str) and isinstance(c["arguments"], dict) for c in calls):
                    calls = None
            except Exception:
                calls = None
        if calls is None:
            out.append(("text", (self.tool_start or "") + body + (self.tool_end or "" if terminated else "")))
            return
        for c in calls:
            self.calls += 1
            out.append(("tool", json.dumps(c, ensure_ascii=False)))


def _as_object(args):
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _only_token(logits, token):
    """Logits that allow exactly one token (the forcing processors' mask)."""
    allowed = mx.arange(logits.shape[-1]) == token
    return mx.where(allowed, mx.zeros_like(logits), mx.full(logits.shape, -float("inf"), dtype=logits.dtype))


class _ThinkingBudget:
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
        return _only_token(logits, self.end_id)


def _think_end(tk):
    # A property in some mlx-lm releases, a method in others.
    end = tk.think_end
    return end() if callable(end) else end


class _ForceTokens:
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
        return _only_token(logits, self.tokens[i])


# How long a waiting prompt may be passed over by shorter ones before it is
# prefilled next regardless (shortest-first would otherwise starve it).
_STARVATION_S = 10.0


class _SpecialText:
    """The tokenizer's special (control) tokens as text, kept from becoming
    control tokens when request text spells them: a user message, a tool
    result or a fetched web page must not be able to forge a turn.

    Before the template renders, each occurrence inside the request's
    strings becomes a private-use placeholder; afterwards the text is put
    back and its spans remembered; the whole string is tokenized once, and a
    special token exactly on a remembered span is replaced by the tokens of
    its text as plain text. src/tokenizer.rs does the same; the start-up
    probes check that both agree."""

    START, END, PLANE = "\ue000", "\ue001", 0xF0000

    def __init__(self, backend):
        added = backend.get_added_tokens_decoder()
        self.texts = sorted({t.content for t in added.values() if t.special and t.content})
        self.ids = {i for i, t in added.items() if t.special}
        plain = copy.deepcopy(backend)
        plain.encode_special_tokens = True
        self.plain = [plain.encode(t, add_special_tokens=False).ids for t in self.texts]
        index = {t: i for i, t in enumerate(self.texts)}
        # Longest first: at each position the longest special wins.
        alternatives = sorted(self.texts, key=len, reverse=True)
        self._find = re.compile("|".join(re.escape(t) for t in alternatives))
        self._placeholder = {t: f"{self.START}{chr(self.PLANE + i)}{self.END}" for t, i in index.items()}
        self._marked = re.compile(f"{self.START}([\U000F0000-\U000FFFFD]){self.END}")

    def neutralize(self, v):
        """(v with special texts in its string values replaced, how many)."""
        if isinstance(v, str):
            n = 0

            def swap(m):
                nonlocal n
                n += 1
                return self._placeholder[m.group(0)]

            out = self._find.sub(swap, v)
            return out, n
        if isinstance(v, list):
            pairs = [self.neutralize(x) for x in v]
            return [x for x, _ in pairs], sum(n for _, n in pairs)
        if isinstance(v, dict):
            pairs = {k: self.neutralize(x) for k, x in v.items()}
            return {k: x for k, (x, _) in pairs.items()}, sum(n for _, n in pairs.values())
        return v, 0

    def tokenize(self, backend, rendered):
        """Token ids of the rendered text with its placeholders put back as
        plain text."""
        out, spans, last = [], [], 0
        length = 0
        for m in self._marked.finditer(rendered):
            i = ord(m.group(1)) - self.PLANE
            if i >= len(self.texts):
                continue
            out.append(rendered[last : m.start()])
            length += m.start() - last
            spans.append((length, length + len(self.texts[i]), i))
            out.append(self.texts[i])
            length += len(self.texts[i])
            last = m.end()
        out.append(rendered[last:])
        enc = backend.encode("".join(out), add_special_tokens=False)
        ids, k = [], 0
        for tok, (start, end) in zip(enc.ids, enc.offsets):
            while k < len(spans) and spans[k][0] < start:
                k += 1
            if k < len(spans) and spans[k][0] == start and spans[k][1] == end and tok in self.ids:
                ids.extend(self.plain[spans[k][2]])
                k += 1
            else:
                ids.append(tok)
        return ids


_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p")


def _sampling_defaults(model, opts):
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
        for k in _SAMPLING_KEYS:
            if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool):
                out[k] = {"value": gen[k], "source": "generation_config.json"}
        if gen.get("do_sample") is False:
            out["temperature"] = {"value": 0.0, "source": "generation_config.json (do_sample: false)"}
    for k, v in (opts.get("model_sampling") or {}).items():
        if k in _SAMPLING_KEYS and k not in out and v is not None:
            out[k] = {"value": v, "source": "model card"}
    for k, v in (opts.get("sampling_flags") or {}).items():
        if k in _SAMPLING_KEYS and v is not None:
            out[k] = {"value": v, "source": "--" + k.replace("_", "-")}
    return out


def _injected_forward_fault(seqs):
    """Test hook (fault injection): a forward pass with a sequence whose
    `fault_forward` threshold is reached raises after it ran."""
    for s in seqs:
        if s.fault_forward is not None and s.generated >= s.fault_forward:
            raise RuntimeError(f"injected fault in a forward pass (request {s.rid}, test hook)")


def _cut_back(cache, n):
    """Each layer's cache back to `n` positions (a failed pass may have
    advanced some layers and not others)."""
    for c in cache:
        offset = getattr(c, "offset", None)
        if isinstance(offset, int) and offset > n and c.is_trimmable():
            c.trim(offset - n)


def _tighten(path, mode):
    """chmod to `mode` unless already there (umask-independent permissions)."""
    if stat.S_IMODE(os.lstat(path).st_mode) != mode:
        os.chmod(path, mode)


def _unsafe_folder(path, st):
    """Why a prefix-cache folder must not be trusted, or None."""
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a plain folder"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _check_entry(tokens, cache, vocab):
    """A restored entry's token ids must be ids of this model, one per
    position of its KV cache."""
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("its token list is missing or empty")
    if not all(type(t) is int and 0 <= t < vocab for t in tokens):
        raise ValueError(f"its token ids are not all integers in [0, {vocab})")
    for c in cache:
        if isinstance(c, KVCache) and c.offset != len(tokens):
            raise ValueError(f"it has {len(tokens)} token ids for {c.offset} cached positions")


def _own_copy(x):
    return x * 1 if isinstance(x, mx.array) else x


def _compact(cache):
    """Exact-size arrays of their own for a cache entering the prefix cache.
    A cache extracted from a batch can be a view that keeps the whole batch's
    buffer alive (while its `nbytes` counts only its own part: measured 400
    MiB held for 179 MiB reported), and a running sequence's cache has spare
    capacity; either would make the byte budget a fiction."""
    for c in cache:
        if isinstance(c, KVCache):
            if c.keys is not None:
                c.keys = c.keys[..., : c.offset, :] * 1
                c.values = c.values[..., : c.offset, :] * 1
        else:
            try:
                c.state = tree_map(_own_copy, c.state)
            except (AttributeError, TypeError, ValueError):
                pass
    mx.eval([c.state for c in cache])
    return cache


class _Seq:
    """One request inside the engine: its own KV cache while its prompt is
    prefilled, its sampling state, and its output state (detokenizer,
    splitter). Once prefilled it joins the running decode batch."""

    __slots__ = (
        "rid", "detok", "splitter", "fault_after", "fault_forward", "generated", "max_tokens",
        "tokens", "todo", "cache", "sampler", "processors", "context",
        "arrived", "first_sent", "failed",
    )

    def __init__(self, rid, tokens, todo, cache, max_tokens, sampler, processors, detok, splitter, fault_after):
        self.rid = rid
        self.tokens = tokens  # the tokens whose keys and values are in the cache
        self.todo = todo  # prompt tokens still to prefill
        self.cache = cache
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.processors = processors
        self.context = None  # TokenBuffer for logits processors
        self.detok = detok
        self.splitter = splitter
        self.fault_after = fault_after
        # Test hook: every forward pass this sequence takes part in raises
        # once it has generated this many tokens (after the pass ran).
        self.fault_forward = None
        self.generated = 0
        self.arrived = time.perf_counter()
        # The first token went out when the prefill sampled it; the decode
        # step that feeds it back must not send it again.
        self.first_sent = False
        self.failed = False


class Engine:
    def __init__(self, model, options_json):
        opts = json.loads(options_json)
        t0 = time.perf_counter()
        self.model_path = model
        if os.path.isdir(model):
            missing = [
                f
                for f in ("config.json",)
                if not os.path.exists(os.path.join(model, f))
            ]
            has_weights = any(f.endswith(".safetensors") for f in os.listdir(model))
            if not has_weights:
                missing.append("*.safetensors")
            if missing:
                raise ModelLoadError(
                    f"model folder {model} is missing {', '.join(missing)}"
                )
        elif model.startswith(("/", "./", "../", "~")) or os.path.exists(model):
            raise ModelLoadError(f"model path {model} does not exist or is not a folder")
        try:
            self.model, self.tokenizer, self.config = mlx_lm.load(
                model, return_config=True
            )
            # A GGUF conversion for the CPU backend: packed on disk, float32 here.
            if pensieve_gguf.dequantize_if_marked(self.model, model):
                self.config.pop("quantization", None)
        except Exception as e:  # hub failures, bad configs, missing tokenizer
            raise ModelLoadError(f"could not load model {model}: {e}") from e
        self.load_seconds = time.perf_counter() - t0
        self.model_context_length = int(
            self.config.get("max_position_embeddings")
            or self.config.get("text_config", {}).get("max_position_embeddings")
            or opts.get("default_context", 4096)
        )
        # --context-length serves less than the model's window (never more).
        self.context_length = min(self.model_context_length, int(opts.get("context_length") or self.model_context_length))
        self.model_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        self.max_batch = int(opts.get("max_batch", 8))
        self.prefill_step = int(opts.get("prefill_step", 512))
        self.prompt_cache_bytes = int(opts.get("prompt_cache_bytes", 1 << 30))
        self.eos_ids = sorted(self.tokenizer.eos_token_ids)
        self.eos_set = set(self.eos_ids)
        self.max_decode_stall = float(opts.get("max_decode_stall", 1.0))
        self._last_decode = time.perf_counter()
        # MLX keeps freed buffers for reuse; bound that cache so resident
        # memory tracks the live KV caches instead of past peaks.
        cache_limit = opts.get("mlx_cache_limit")
        if cache_limit is not None:
            mx.set_cache_limit(int(cache_limit))
        self.prompt_cache = LRUPromptCache(max_size=256, max_bytes=self.prompt_cache_bytes)
        self.persist_dir = opts.get("prompt_cache_dir")
        self.sampling_defaults = _sampling_defaults(model, opts)
        # Request text that spells a control token stays text (unless the
        # operator allows it: --special-tokens-in-content).
        self._specials = None
        backend = getattr(self.tokenizer._tokenizer, "backend_tokenizer", None)
        if backend is not None and not opts.get("special_tokens_in_content"):
            specials = _SpecialText(backend)
            self._specials = specials if specials.texts else None
        # Metal: keep the weights wired (mlx-lm does the same for its generators).
        maybe_set_recommended_wired_limit()
        # Sequences share decode steps only if this model batches (its caches
        # merge and its attention takes batch masks); otherwise one at a time.
        self._batchable = self._can_batch()
        self.prefill_batch = max(1, int(opts.get("prefill_batch", 2)))
        self._head = self._find_head()
        self._kv_peak = 0  # most KV bytes (prefix cache + live) held at once
        self._peak_batch = 0  # most sequences decoded in one step so far
        self._decoded_since_prefill = False
        self.waiting = []  # _Seq still prefilling, in arrival order
        self.by_rid = {}  # rid -> _Seq
        self._reset_batch()

    def _reset_batch(self):
        """The running decode batch: its sequences in batch order, one cache
        per layer (the sequence's own caches while it runs alone, merged batch
        caches once several run), and the tokens the next step feeds."""
        self.running = []
        self.batch_cache = None
        self.batched = False
        self.next_tokens = None

    # ---- prefix cache on disk -------------------------------------------

    def _persist_folder(self):
        """This model's folder under the prompt-cache directory: the name is a
        fingerprint of the model (path, config, weight files), so entries are
        only ever restored into the model that computed them."""
        h = hashlib.sha256()
        h.update(self.model_path.encode())
        h.update(json.dumps(self.config, sort_keys=True, default=str).encode())
        if os.path.isdir(self.model_path):
            for f in sorted(os.listdir(self.model_path)):
                if f.endswith(".safetensors"):
                    st = os.stat(os.path.join(self.model_path, f))
                    h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return os.path.join(self.persist_dir, h.hexdigest()[:16])

    def restore_prompt_cache(self):
        """Loads the entries a previous run saved (oldest first, so the LRU
        order survives). Returns (entries, bytes, skipped, warnings).

        The folder holds conversations, so what is read from it is checked:
        the folder must be this user's and writable by no one else, only
        regular files are opened (a planted FIFO would block the read, a
        symlink could point anywhere), and an entry's token ids must be
        integers below the vocabulary size, as many as its KV length."""
        if not self.persist_dir:
            return 0, 0, 0, []
        folder = self._persist_folder()
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            return 0, 0, 0, []
        problem = _unsafe_folder(folder, st)
        if problem:
            return 0, 0, 0, [f"not restoring the prefix cache: {problem}"]
        _tighten(folder, 0o700)
        n = skipped = 0
        warnings = []
        vocab = self._vocab_size()
        for f in sorted(os.listdir(folder)):
            path = os.path.join(folder, f)
            if not f.endswith(".safetensors"):
                continue
            try:
                fst = os.lstat(path)
                if not stat.S_ISREG(fst.st_mode):
                    raise ValueError("not a regular file (symlink, FIFO or device): not opened")
                _tighten(path, 0o600)
                cache, meta = load_prompt_cache(path, return_metadata=True)
                tokens = json.loads(meta["tokens"])
                _check_entry(tokens, cache, vocab)
                if sum(c.nbytes for c in cache) + self.prompt_cache.nbytes > self.prompt_cache_bytes:
                    skipped += 1
                    continue
                self.prompt_cache.insert_cache(
                    self.model_path, tokens, cache, cache_type=meta.get("cache_type", "assistant")
                )
                n += 1
            except Exception as e:
                skipped += 1
                warnings.append(f"skipped prefix-cache entry {path}: {e}")
        return n, int(self.prompt_cache.nbytes), skipped, warnings

    def _vocab_size(self):
        cfg = self.config.get("text_config", self.config) if "vocab_size" not in self.config else self.config
        v = cfg.get("vocab_size")
        return int(v) if v else len(self.tokenizer._tokenizer)

    def persist_prompt_cache(self):
        """Writes the prefix cache to disk (replacing the previous set) so a
        restart keeps warm prefixes. Folders are 0700 and files 0600 whatever
        the umask: they hold conversations. Returns (entries, bytes)."""
        if not self.persist_dir:
            return 0, 0
        folder = self._persist_folder()
        os.makedirs(self.persist_dir, mode=0o700, exist_ok=True)
        _tighten(self.persist_dir, 0o700)
        # Leftovers of a save that was killed midway.
        parent, name = os.path.split(folder)
        if os.path.isdir(parent):
            for f in os.listdir(parent):
                if f.startswith((f"{name}.tmp-", f"{name}.old-")):
                    shutil.rmtree(os.path.join(parent, f), ignore_errors=True)
        tmp = f"{folder}.tmp-{os.getpid()}"
        os.makedirs(tmp, mode=0o700)
        _tighten(tmp, 0o700)
        lru = self.prompt_cache._lru
        n = nbytes = 0
        # Oldest first across the LRU's queues: restored in this order, the
        # most recent entries are the last evicted.
        entries = [(model, tokens, kind) for kind in reversed(lru._ordering) for model, tokens in lru._lrus[kind]]
        for model, tokens, kind in entries:
            if model != self.model_path:
                continue
            entry = self.prompt_cache._trie.get(model, tokens)
            path = os.path.join(tmp, f"{n:06d}.safetensors")
            save_prompt_cache(
                path,
                entry.prompt_cache,
                {"tokens": json.dumps(list(tokens)), "cache_type": kind},
            )
            _tighten(path, 0o600)
            n += 1
            nbytes += entry.nbytes
        old = f"{folder}.old-{os.getpid()}"
        if os.path.isdir(folder):
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        return n, nbytes

    # ---- facts the Rust side reports ------------------------------------

    def info(self):
        return json.dumps(
            {
                "model": self.model_path,
                "model_type": self.config.get("model_type"),
                "context_length": self.context_length,
                "model_context_length": self.model_context_length,
                "vocab_size": self.config.get("vocab_size"),
                "model_bytes": self.model_bytes,
                "load_seconds": self.load_seconds,
                "eos_token_ids": self.eos_ids,
                "has_chat_template": bool(self.tokenizer.has_chat_template),
                "mlx_version": mx.__version__,
                "device": str(mx.default_device()),
                "batching": self._batchable,
                "sampling_defaults": self.sampling_defaults,
                "thinking": bool(self.tokenizer.has_thinking),
                "late_system": self._late_system_mode(),
                "template": self._template_info(),
            }
        )

    def _template_kwargs(self):
        """Template variables mlx-lm adds, so Rust can render identically."""
        kwarg = getattr(self.tokenizer, "_thinking_kwarg", "enable_thinking")
        return {kwarg: bool(self.tokenizer.has_thinking)}

    def _template_info(self):
        """What the Rust side needs to tokenize prompts itself (src/tokenizer.rs)."""
        hf = self.tokenizer._tokenizer
        folder = getattr(hf, "name_or_path", None) or ""
        tok_file = os.path.join(folder, "tokenizer.json")
        template = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else None
        specials = {
            k: v for k, v in (getattr(hf, "special_tokens_map", None) or {}).items() if isinstance(v, str)
        }
        tk = self.tokenizer
        return {
            "tokenizer_file": tok_file if os.path.exists(tok_file) else None,
            "chat_template": template if tk.has_chat_template else None,
            "special_tokens": specials,
            "template_kwargs": self._template_kwargs(),
            "thinking_kwarg": getattr(tk, "_thinking_kwarg", "enable_thinking"),
            "tool_call_start": tk.tool_call_start,
            "tool_call_end": tk.tool_call_end,
            "tool_parser": self._tool_parser_type(),
        }

    def _late_system_mode(self):
        """How this template takes a system message in mid-conversation:
        "system" (rendered where it stands), "user" (dropped or refused
        there, but consecutive user turns are fine: it becomes its own user
        turn) or "merge" (roles must alternate: it joins a user turn)."""
        if not self.tokenizer.has_chat_template:
            return "system"  # the plain transcript prints every role in place
        kw = dict(add_generation_prompt=True, tokenize=False, **self._template_kwargs())
        a, probe, b = "PNSVUSERA", "PNSVPROBE", "PNSVUSERB"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": a}, {"role": "system", "content": probe},
                 {"role": "user", "content": b}], **kw)
            if a in text and probe in text and text.index(a) < text.index(probe) < text.index(b):
                return "system"
        except Exception:
            pass
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": a}, {"role": "user", "content": b}], **kw)
            if a in text and b in text:
                return "user"
        except Exception:
            pass
        return "merge"

    def _tool_parser_type(self):
        parser = self.tokenizer.tool_parser
        mod = getattr(parser, "__module__", "") or ""
        return mod.rsplit(".", 1)[-1] if parser else None

    def memory(self):
        return (
            int(mx.get_active_memory()),
            int(mx.get_peak_memory()),
            int(mx.get_cache_memory()),
            int(self.prompt_cache.nbytes),
            len(self.by_rid),
            int(self._active_cache_bytes()),
            int(self._kv_peak),
            int(self._peak_batch),
        )

    # ---- prompts ---------------------------------------------------------

    def render(self, prompt_json):
        """Turn the internal prompt (messages + tools, or a raw prompt) into
        token ids with the model's own chat template."""
        p = json.loads(prompt_json)
        if p.get("raw_prompt") is not None:
            return self.tokenizer.encode(p["raw_prompt"])
        messages = p["messages"]
        tools = p.get("tools")
        marked = 0
        if self._specials is not None and self.tokenizer.has_chat_template:
            messages, n = self._specials.neutralize(messages)
            tools, m = self._specials.neutralize(tools)
            marked = n + m
        kwargs = {}
        if tools:
            kwargs["tools"] = tools
        if self.tokenizer.has_chat_template:
            kwargs.update(self._template_kwargs())
            if p.get("enable_thinking") is not None:
                kwargs[getattr(self.tokenizer, "_thinking_kwarg", "enable_thinking")] = p["enable_thinking"]
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
            if marked:
                return self._specials.tokenize(self.tokenizer._tokenizer.backend_tokenizer, text)
            return self.tokenizer.encode(text, add_special_tokens=False)
        # No template: a plain transcript, so base models still work.
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        return self.tokenizer.encode(text + "assistant: ")

    # ---- generation ------------------------------------------------------

    def submit(self, rid, tokens, params_json):
        """Queue one request into the running batch. Returns (prompt tokens
        served from the prefix cache, max_tokens after clamping)."""
        p = json.loads(params_json)
        if not tokens:
            raise InvalidPrompt("the prompt is empty (no tokens to start from)")
        if len(tokens) >= self.context_length:
            # Anthropic's wording, which Claude Code parses (N and M) to compact
            # the conversation; M leaves room for one generated token.
            raise InvalidPrompt(
                f"prompt is too long: {len(tokens)} tokens > {self.context_length - 1} maximum"
            )
        max_tokens = max(1, min(p["max_tokens"], self.context_length - len(tokens)))
        cache, rest = self.prompt_cache.fetch_nearest_cache(self.model_path, tokens)
        if cache is not None and not rest:
            # Exact hit: the generator needs at least one token to feed.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            else:
                cache, rest = None, tokens
        cached = len(tokens) - len(rest)
        processors = []
        budget = p.get("thinking_budget")
        if budget is not None and self.tokenizer.has_thinking:
            processors.append(_ThinkingBudget(self.tokenizer, budget))
        force = p.get("force_tool")
        if force and p.get("tools"):
            forced = self._forced_call_tokens(p["tools"], force.get("name"))
            if forced is None:
                raise InvalidPrompt("tool_choice: could not derive this model's tool-call opening from its template")
            processors.append(_ForceTokens(forced, len(tokens)))
        seq = _Seq(
            rid,
            tokens=list(tokens[:cached]),
            todo=list(rest),
            cache=cache if cache is not None else make_prompt_cache(self.model),
            max_tokens=max_tokens,
            sampler=make_sampler(seed=p.get("seed"), **self._sampling(p)),
            processors=processors,
            detok=self.tokenizer.detokenizer,
            splitter=self._splitter(tokens, p),
            fault_after=p.get("fault_after"),
        )
        fault = p.get("fault")
        if p.get("fault_forward_after") is not None:
            seq.fault_forward = int(p["fault_forward_after"])
        if p.get("fault_sampler_after") is not None:
            seq.sampler = _sampler_raising_after(seq.sampler, int(p["fault_sampler_after"]))
        if fault == "raise-in-sampler":
            seq.sampler = _raising_sampler
        elif fault == "poison-sampling":
            _poison_random_state()
        self.waiting.append(seq)
        self.by_rid[rid] = seq
        self._trim_prompt_cache()
        return cached, max_tokens

    def _sampling(self, p):
        """A request's sampling: its own values, else the defaults in force
        (the model's, then the server's flags), else the API defaults."""
        d = self.sampling_defaults

        def pick(key, api_default):
            v = p.get(key)
            if v is None:
                v = d.get(key, {}).get("value")
            return api_default if v is None else v

        return {"temperature": float(pick("temperature", 1.0)), "top_p": float(pick("top_p", 1.0)),
                "top_k": int(pick("top_k", 0)), "min_p": float(pick("min_p", 0.0))}

    def _splitter(self, tokens, p):
        tk = self.tokenizer
        state = "text"
        if tk.has_thinking and tk.think_start_tokens:
            # Templates that open the thinking block in the generation prompt.
            n = len(tk.think_start_tokens)
            last_start = tk.rfind_think_start(tokens, start=max(0, len(tokens) - 16))
            if last_start != -1 and last_start + n >= len(tokens) - 2:
                state = "thinking"
        sp = Splitter(
            tool_start=tk.tool_call_start if p.get("tools") else None,
            tool_end=tk.tool_call_end,
            parse_tool=tk.tool_parser if p.get("tools") else None,
            tools=p.get("tools"),
            think_start=tk.think_start if tk.has_thinking else None,
            think_end=_think_end(tk) if tk.has_thinking else None,
            state=state,
            show_thinking=bool(p.get("thinking")),
        )
        return sp

    def _forced_call_tokens(self, tools, name):
        """The tokens that open a tool call in this model's own format, as
        its template renders one: up to and including the call marker (any
        tool), or through the tool's name (a named tool). Forcing the model's
        natural tokens, rather than appending text to the prompt, keeps the
        continuation in distribution."""
        tk = self.tokenizer
        call_name = name or tools[0]["function"]["name"]
        user = [{"role": "user", "content": "x"}]
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": call_name, "arguments": {}}}]}
        kw = dict(tools=tools, tokenize=False, **self._template_kwargs())
        base = tk.apply_chat_template(user, add_generation_prompt=True, **kw)
        full = tk.apply_chat_template(user + [call], add_generation_prompt=False, **kw)
        if not full.startswith(base) or not tk.tool_call_start:
            return None
        turn = full[len(base):]
        start = turn.find(tk.tool_call_start)
        if start < 0:
            return None
        end = start + len(tk.tool_call_start)
        if name:
            at = turn.find(name, end)
            if at < 0:
                return None
            end = at + len(name)
        base_ids = tk.encode(base, add_special_tokens=False)
        ids = tk.encode(full, add_special_tokens=False)
        if ids[: len(base_ids)] != base_ids:
            return None
        forced = []
        for t in ids[len(base_ids):]:
            forced.append(t)
            if len(tk.decode(forced)) >= end:
                return forced
        return None

    def _active_cache_bytes(self):
        total = sum(c.nbytes for s in self.waiting for c in s.cache)
        if self.batch_cache:
            total += sum(c.nbytes for c in self.batch_cache)
        return total

    def _trim_prompt_cache(self):
        active = self._active_cache_bytes()
        self.prompt_cache.trim_to(n_bytes=max(0, self.prompt_cache_bytes - active))

    def cancel(self, rid):
        s = self.by_rid.pop(rid, None)
        if s is None:
            return
        if s in self.waiting:
            self.waiting.remove(s)
        elif s in self.running:
            # Keep what it computed: a client that stops a turn early usually
            # sends the same conversation again.
            i = self.running.index(s)
            try:
                self.prompt_cache.insert_cache(self.model_path, list(s.tokens), _compact(self._running_cache(i)))
            except Exception:
                pass  # only an optimisation; the sequence leaves the batch regardless
            self._keep([j for j in range(len(self.running)) if j != i])
            self._trim_prompt_cache()

    def close(self):
        """The engine stops: drop every sequence and wait for MLX's queued
        work (the pipelined next decode step), so nothing computes while the
        process tears the libraries down."""
        self.waiting.clear()
        self.by_rid.clear()
        self._reset_batch()
        # The pipelined step runs on the generation stream, not on this
        # thread's default stream: wait for both. (Waiting on the default
        # stream alone let a queued step finish, and free its buffers, while
        # the process exit was already destroying MLX's allocator: a heap
        # corruption at test-process exit, about one run in fifteen.)
        mx.synchronize(generation_stream)
        mx.synchronize()

    def check_sampling(self):
        # On the stream generation runs on, like every other engine op.
        with mx.stream(generation_stream):
            return check_sampling()

    def has_work(self):
        return bool(self.by_rid)

    # ---- scheduling ------------------------------------------------------

    def step(self):
        """One engine step: a prefill chunk of one waiting prompt, or one
        decode token for every running sequence.

        Returns a list of (rid, pieces, finish_reason, error, counts) tuples,
        where pieces is a list of (kind, text) with kind "text", "thinking"
        or "tool" (a JSON {name, arguments}) and `counts` says whether the
        item is a newly generated token. A Python error while handling one
        request's output fails only that request; an error in the shared
        decode pass fails the running batch (waiting prompts keep their own
        caches and still run).

        Scheduling: waiting prompts are prefilled shortest first (a prompt
        passed over for `_STARVATION_S` goes next), up to `prefill_batch` of
        them in one pass (long ones alone, chunk by chunk), and each prompt's
        last logits give its first token, which is sent at once; the sequence
        then joins the decode batch. While prompts wait, the running batch
        pauses for at most `max_decode_stall` seconds between its decode
        steps (then prefill and decode steps take turns), so a burst of
        newcomers gets first tokens early without starving the streams
        already running.
        """
        out = []
        with mx.stream(generation_stream):
            if self.waiting and self._may_prefill():
                self._decoded_since_prefill = False
                self._prefill(out)
                # A prefill's activations are large and short-lived: give
                # them back rather than keep them in MLX's buffer cache.
                mx.clear_cache()
            elif self.running:
                self._decode(out)
        if any(item[2] is not None or item[3] is not None for item in out):
            self._trim_prompt_cache()
        self._kv_peak = max(self._kv_peak, self.prompt_cache.nbytes + self._active_cache_bytes())
        return out

    def _may_prefill(self):
        """Prefill while nothing runs, within the stall window after a decode
        step, and otherwise in turns with decode steps (one prefill step after
        each decode step), so neither side starves."""
        if not self.running:
            return True
        if not self._batchable or len(self.running) >= self.max_batch:
            return False
        if time.perf_counter() - self._last_decode < self.max_decode_stall:
            return True
        return self._decoded_since_prefill

    def _pick(self):
        oldest = self.waiting[0]
        if time.perf_counter() - oldest.arrived > _STARVATION_S:
            return oldest
        return min(self.waiting, key=lambda s: len(s.todo))

    def _prefill(self, out):
        s = self._pick()
        if len(s.todo) > self.prefill_step:
            # A long prompt: one chunk now, the rest in later steps. Only the
            # cache is evaluated (no logits: the head never runs on it).
            n = self.prefill_step
            try:
                self._forward_hidden(mx.array([s.todo[:n]]), s.cache)
                mx.eval([c.state for c in s.cache])
            except Exception as e:
                self._fail([s], e, out)
                return
            s.tokens.extend(s.todo[:n])
            s.todo = s.todo[n:]
            return
        self._prefill_last(self._group(s), out)

    def _group(self, s):
        """`s` plus the shortest other waiting prompts that fit in one chunk,
        up to `prefill_batch` in all, while right padding stays under a
        quarter of the real tokens."""
        group = [s]
        if self.prefill_batch <= 1 or not self._batchable:
            return group
        longest, total = len(s.todo), len(s.todo)
        for c in sorted(self.waiting, key=lambda w: len(w.todo)):
            if len(group) >= self.prefill_batch:
                break
            if c is s or len(c.todo) > self.prefill_step:
                continue
            L = max(longest, len(c.todo))
            if L * (len(group) + 1) > 1.25 * (total + len(c.todo)):
                continue
            group.append(c)
            longest, total = L, total + len(c.todo)
        return group

    def _prefill_last(self, group, out):
        """Prefills the last chunk of each prompt in `group` in one forward
        pass (right-padded), samples every first token from the prefill's
        own logits, sends them, and moves the sequences to the decode batch."""
        k = len(group)
        lengths = [len(s.todo) for s in group]
        try:
            if k == 1:
                cache = group[0].cache
                x = mx.array([group[0].todo])
            else:
                cache = [layer[0].merge(list(layer)) for layer in zip(*(s.cache for s in group))]
                longest = max(lengths)
                pad = [longest - n for n in lengths]
                x = mx.array([s.todo + [0] * (longest - len(s.todo)) for s in group])
                if max(pad) > 0:
                    for c in cache:
                        c.prepare(lengths=lengths, right_padding=pad)
            logits = self._last_logits(x, cache, [n - 1 for n in lengths])
            _injected_forward_fault(group)
            if k > 1 and max(pad) > 0:
                for c in cache:
                    c.finalize()
            mx.eval(logits)
        except Exception as e:
            if k > 1:
                # The merged pass failed; each prompt's own cache is untouched:
                # prefill them one by one, so only the one that fails gets the error.
                mx.clear_cache()
                for s in group:
                    self._prefill_last([s], out)
            else:
                self._fail(group, e, out)
            return
        try:
            for s in group:
                self.waiting.remove(s)
                s.tokens.extend(s.todo)
                s.todo = []
                if s.processors:
                    s.context = TokenBuffer(s.tokens)
        except Exception as e:
            self._fail(group, e, out)
            return
        failed = set()
        try:
            sampled = self._sample(group, logits, None)
            firsts = sampled.tolist()
        except Exception as e:
            if k == 1:
                self._fail(group, e, out)
                return
            # One request's sampling (its processors, its sampler) failed the
            # group's: sample each on its own, so only the one that fails gets
            # the error. A failed row gets a placeholder and is dropped below.
            rows = []
            for i, s in enumerate(group):
                try:
                    row = self._sample([s], logits[i : i + 1], None)
                    row.tolist()
                except Exception as e1:
                    self._fail([s], e1, out)
                    failed.add(i)
                    row = mx.zeros((1,), dtype=mx.uint32)
                rows.append(row.astype(mx.uint32))
            sampled = mx.concatenate(rows, axis=0)
            firsts = sampled.tolist()
        keep = []
        for i, s in enumerate(group):
            if i in failed:
                continue
            if not self._emit(s, firsts[i], out):
                s.first_sent = True
                keep.append(i)
            elif not s.failed:  # a failed one was reported and dropped by _fail
                self._finished(s, cache if k == 1 else [c.extract(i) for c in cache])
        if not keep:
            return
        try:
            if k > 1 and len(keep) < k:
                sampled = sampled[mx.array(keep)]
                if len(keep) == 1:
                    cache = [c.extract(keep[0]) for c in cache]
                else:
                    for c in cache:
                        c.filter(keep)
            self._join([group[i] for i in keep], cache, sampled)
        except Exception as e:
            self._fail([group[i] for i in keep], e, out)

    def _fail(self, seqs, e, out):
        msg = f"{type(e).__name__}: {e}"
        for s in seqs:
            if s in self.waiting:
                self.waiting.remove(s)
            self.by_rid.pop(s.rid, None)
            out.append((s.rid, [], None, msg, False))

    def _forward_hidden(self, x, cache):
        """The forward pass up to the head when the head is split off."""
        if self._head is not None:
            return self.model.model(x, cache=cache)
        return self.model(x, cache=cache)

    def _last_logits(self, x, cache, last):
        """Logits at position `last[i]` of each row: the head (a vocabulary-
        sized matmul) runs on those positions only, where the model allows."""
        rows, cols = mx.arange(x.shape[0]), mx.array(last)
        if self._head is not None:
            h = self.model.model(x, cache=cache)
            return self._head(h[rows, cols][:, None, :])[:, 0, :]
        return self.model(x, cache=cache)[rows, cols]

    def _can_batch(self):
        """Runs what batching does on a tiny probe — two prompts of different
        lengths prefilled together right-padded, then a decode step on their
        merged cache joined by a third — and says whether the model takes it
        (some attention implementations cannot use batch masks)."""
        if not all(hasattr(c, "merge") for c in make_prompt_cache(self.model)):
            return False
        try:
            caches = [make_prompt_cache(self.model) for _ in range(2)]
            group = [layer[0].merge(list(layer)) for layer in zip(*caches)]
            for c in group:
                c.prepare(lengths=[3, 5], right_padding=[2, 0])
            self.model(mx.array([[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]), cache=group)
            for c in group:
                c.finalize()
            third = make_prompt_cache(self.model)
            self.model(mx.array([[4, 5]]), cache=third)
            for ca, cb in zip(group, [c.merge([c]) for c in third]):
                ca.extend(cb)
            mx.eval(self.model(mx.array([[6], [7], [8]]), cache=group))
            return True
        except Exception:
            return False

    def _find_head(self):
        """The model's output head, if running `model.model` and then the head
        on chosen positions computes exactly what `model(...)` does (checked
        on a probe; models with extra output transforms fail it and keep the
        full forward pass)."""
        inner = getattr(self.model, "model", None)
        if inner is None or not callable(inner):
            return None
        heads = []
        if hasattr(self.model, "lm_head"):
            heads.append(self.model.lm_head)
        emb = getattr(inner, "embed_tokens", None)
        if emb is not None and hasattr(emb, "as_linear"):
            heads.append(emb.as_linear)
        try:
            x = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
            full = self.model(x, cache=make_prompt_cache(self.model))[:, -1, :]
            h = inner(x, cache=make_prompt_cache(self.model))[:, -1:, :]
            for head in heads:
                fast = head(h)[:, -1, :]
                if fast.shape == full.shape and mx.allclose(fast, full, rtol=1e-4, atol=1e-4).item():
                    return head
        except Exception:
            pass
        return None

    def _join(self, seqs, cache, tokens):
        """Adds prefilled sequences (with their cache: plain for one, a batch
        cache for several) to the running batch."""
        batched = len(seqs) > 1
        if not self.running:
            self.batch_cache = cache
            self.batched = batched
            self.next_tokens = tokens
            # The stall window runs from the newest token of any running
            # stream: these just got their first.
            self._last_decode = time.perf_counter()
        else:
            if not self.batched:
                self.batch_cache = [c.merge([c]) for c in self.batch_cache]
                self.batched = True
            new = cache if batched else [c.merge([c]) for c in cache]
            for ca, cb in zip(self.batch_cache, new):
                ca.extend(cb)
            self.next_tokens = mx.concatenate([self.next_tokens, tokens])
        self.running.extend(seqs)
        self._peak_batch = max(self._peak_batch, len(self.running))
        for s in seqs:
            s.cache = None

    def _running_cache(self, i):
        """The cache of the running sequence at `i`, on its own."""
        return [c.extract(i) for c in self.batch_cache] if self.batched else self.batch_cache

    def _keep(self, keep):
        """Shrinks the running batch to the sequences at `keep`."""
        if not keep:
            self._reset_batch()
            return
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        self.next_tokens = self.next_tokens[mx.array(keep)]
        if len(keep) == 1:
            # Alone again: back to plain caches (no padding, no masks).
            self.batch_cache = [c.extract(keep[0]) for c in self.batch_cache]
            self.batched = False
        else:
            for c in self.batch_cache:
                c.filter(keep)

    def _decode(self, out):
        seqs = self.running
        inputs = self.next_tokens
        try:
            logits = self.model(inputs[:, None], cache=self.batch_cache)[:, -1, :]
            _injected_forward_fault(seqs)
            sampled = self._sample(seqs, logits, inputs)
            # The next step's tokens compute while this step's are handed out.
            mx.async_eval(sampled)
            tokens = inputs.tolist()
        except Exception as e:
            if len(seqs) > 1 and self._decode_apart(seqs, inputs, out):
                return
            self._fail(seqs, e, out)
            self._reset_batch()
            return
        self.next_tokens = sampled
        self._last_decode = time.perf_counter()
        self._decoded_since_prefill = True
        keep, done = [], []
        for i, (s, t) in enumerate(zip(seqs, tokens)):
            s.tokens.append(t)
            if s.first_sent:
                s.first_sent = False
                keep.append(i)
            elif self._emit(s, t, out):
                done.append(i)
            else:
                keep.append(i)
        for i in done:
            if not seqs[i].failed:  # a failed one was reported and dropped by _fail
                self._finished(seqs[i], self._running_cache(i))
        self._keep(keep)

    def _decode_apart(self, seqs, inputs, out):
        """A batched decode step raised (an MLX error, out of memory, a bug
        in one request's processors): every sequence runs the step again on
        its own, its cache cut back to its own tokens (undoing whatever the
        failed pass wrote), so only a sequence that fails alone gets the
        error; the others rejoin one batch with the tokens they would have
        had. Returns False when the step cannot be split (its input tokens
        themselves cannot be computed)."""
        mx.clear_cache()  # out of memory: give the failed pass's buffers back first
        try:
            inputs.tolist()
            alone = [(s, self._running_cache(i), inputs[i : i + 1]) for i, s in enumerate(seqs)]
            for s, cache, _ in alone:
                _cut_back(cache, len(s.tokens))
        except Exception:
            return False
        for s in seqs:
            if s.context is not None:
                # The failed step may have appended its input token to the
                # context already; the step's rerun appends it again.
                s.context._size = len(s.tokens)
        self._reset_batch()
        rejoin = []
        for s, cache, token in alone:
            self.running, self.batch_cache, self.batched, self.next_tokens = [s], cache, False, token
            self._decode(out)
            if self.running:
                rejoin.append((self.running[0], self.batch_cache, self.next_tokens))
            self._reset_batch()
        for s, cache, token in rejoin:
            self._join([s], cache, token)
        return True

    def _sample(self, seqs, logits, inputs):
        """Next tokens of `seqs` (one row of `logits` each), through their
        logits processors and their own samplers; one call for a batch that
        shares a sampler (every greedy request does). An exception leaves
        MLX's global random state as it was (see _RandomStateGuard)."""
        with _RandomStateGuard():
            return self._sample_unguarded(seqs, logits, inputs)

    def _sample_unguarded(self, seqs, logits, inputs):
        if any(s.processors for s in seqs):
            rows = []
            for i, s in enumerate(seqs):
                row = logits[i : i + 1]
                if s.processors:
                    ctx = s.context.tokens if inputs is None else s.context.update_and_fetch(inputs[i : i + 1])
                    for proc in s.processors:
                        row = proc(ctx, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        first = seqs[0].sampler
        if all(s.sampler is first for s in seqs):
            return first(logprobs)
        return mx.concatenate([s.sampler(logprobs[i : i + 1]) for i, s in enumerate(seqs)], axis=0)

    def _finished(self, s, cache):
        """A sequence ended normally: keep its KV cache for prefix reuse."""
        self.by_rid.pop(s.rid, None)
        self.prompt_cache.insert_cache(self.model_path, list(s.tokens), _compact(cache))

    def _emit(self, s, token, out):
        """Turns one generated token into an output item. Returns True when
        the request is done (finished or failed)."""
        try:
            s.generated += 1
            if s.fault_after is not None and s.generated > s.fault_after:
                raise RuntimeError(f"injected fault after {s.fault_after} tokens (test hook)")
            finish = None
            if token in self.eos_set:
                finish = "stop"
            else:
                s.detok.add_token(token)
                if s.generated >= s.max_tokens:
                    finish = "length"
            if finish is not None:
                s.detok.finalize()
            pieces = s.splitter.feed(s.detok.last_segment)
            if finish is not None:
                pieces += s.splitter.finish()
            out.append((s.rid, pieces, finish, None, True))
            return finish is not None
        except Exception as e:
            s.failed = True
            self._fail([s], e, out)
            return True


_forward_models = {}


def forward_logits(model_path, tokens):
    """Logits of one forward pass (float32, flattened): a numerical check."""
    if model_path not in _forward_models:
        _forward_models[model_path] = pensieve_gguf.load(model_path)[0]
    out = _forward_models[model_path](mx.array([tokens]))
    return out.astype(mx.float32).reshape(-1).tolist()


# ---- the built-in demo model ---------------------------------------------

_DEMO_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif -%}"
    "# Tools\nYou may call one or more functions. Function signatures:\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "To call a function, reply with <tool_call>{\"name\": <name>, \"arguments\": <args-json>}</tool_call>"
    "<|im_end|>\n"
    "{%- elif messages and messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{%- else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}"
    "{%- if message.get('tool_calls') %}{%- for tc in message['tool_calls'] %}"
    "\n<tool_call>{\"name\": \"{{ tc['function']['name'] }}\", \"arguments\": {{ tc['function']['arguments'] | tojson }}}</tool_call>"
    "{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

# Appended to the demo template for "demo-think": the generation prompt opens
# a thinking block unless the request turns thinking off.
_THINK_SUFFIX = (
    "{%- if add_generation_prompt and (enable_thinking is not defined or enable_thinking) %}<think>\n{%- endif %}"
)

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu "
    "the a an and or of to in on for with is are was were be it this that you I we they "
    "hello world weather sunny rain cloudy wind city today tomorrow temperature degrees "
    "function call tool result error file read write edit bash search agent code test "
    "name arguments description type object string number boolean array properties required "
    "system user assistant model token prompt cache server request response stream message"
).split()


def _demo_corpus():
    import random

    rng = random.Random(1234)
    lines = []
    for _ in range(4000):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", ";"]))
    lines.append('{"name": "get_weather", "arguments": {"city": "Paris"}} [1, 2, 3] <tool_call></tool_call>')
    lines.append("0123456789 ()[]{}<>/\\|-_=+*&^%$#@~`'\" é ü ñ 你好 😀")
    return lines


def _bench_corpus():
    """A large synthetic corpus (Zipf-distributed pseudo-words) so that BPE
    training reaches a realistic vocabulary size."""
    import random

    rng = random.Random(4321)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ea")]
    lexicon = list(_WORDS)
    while len(lexicon) < 30000:
        lexicon.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    lines = _demo_corpus()
    for _ in range(60000):
        words = rng.choices(lexicon, weights, k=rng.randint(6, 20))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return lines


# Architecture presets (llama family). "demo" is the built-in model; the
# others give benchmark-realistic shapes with random weights.
MODEL_SHAPES = {
    "demo": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo"),
    # The same with <think>/</think> tokens and a template that opens a
    # thinking block (as Qwen3's does): for testing thinking end to end.
    "demo-think": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", think=True),
    # SmolLM-135M's shape with an 8k vocabulary.
    "smollm-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                        num_attention_heads=9, num_key_value_heads=3, vocab=8192, corpus="bench"),
    "smollm-360m": dict(hidden_size=960, num_hidden_layers=32, intermediate_size=2560,
                        num_attention_heads=15, num_key_value_heads=5, vocab=8192, corpus="bench"),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                     num_attention_heads=32, num_key_value_heads=8, vocab=8192, corpus="bench"),
    # A Gemma-2-architecture demo: its attention (logit soft-capping) cannot
    # take batch masks, so it exercises one-at-a-time serving.
    # The demo shape in the other GGUF architectures (tests of the GGUF path).
    "demo-qwen2": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", arch="qwen2"),
    "demo-qwen3": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", arch="qwen3"),
    "demo-gemma2": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", arch="gemma2",
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16),
}


def make_demo_model(dest, shape="demo"):
    """A built-in random-weight model (see make_model)."""
    return make_model(dest, shape)


def generated_model_key(shape):
    """The folder name of a generated model: everything that decides its
    weights and tokenizer (its shape, this generator's version, the MLX,
    mlx-lm and tokenizers versions that seed, initialise and train it), so
    an upgrade never serves a folder another version made."""
    import tokenizers

    made_by = json.dumps([DEMO_MODEL_VERSION, MODEL_SHAPES[shape], mx.__version__, mlx_lm.__version__,
                          tokenizers.__version__], sort_keys=True, default=str)
    return f"{DEMO_MODEL_VERSION}-{shape}-{hashlib.sha256(made_by.encode()).hexdigest()[:12]}"


def make_model(dest, shape="demo", dtype="float32"):
    """Create a model folder at `dest` (atomically), unless it exists: a real
    llama-architecture model with seeded random weights and a byte-level BPE
    tokenizer trained offline. Loads with mlx_lm.load like any model; its
    output is not meaningful text."""
    marker = os.path.join(dest, ".complete")
    if os.path.exists(marker):
        return dest
    import importlib

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = dict(MODEL_SHAPES[shape])
    think = spec.pop("think", False)
    arch = spec.pop("arch", "llama")
    corpus = _demo_corpus() if spec.pop("corpus") == "demo" else _bench_corpus()
    import uuid

    tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<think>", "</think>"] if think else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.pop("vocab"),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": 32768,
                "clean_up_tokenization_spaces": False,
                "chat_template": _DEMO_TEMPLATE + (_THINK_SUFFIX if think else ""),
            },
            f,
            indent=1,
        )
    config = {
        "model_type": arch,
        "architectures": [{"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        **spec,
        "head_dim": spec["hidden_size"] // spec["num_attention_heads"],
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "pensieve_shape": shape,
        "pensieve_version": DEMO_MODEL_VERSION,
    }
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    mx.random.seed(0)
    family = importlib.import_module(f"mlx_lm.models.{arch}")
    model = family.Model(family.ModelArgs.from_dict(config))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(os.path.join(tmp, "model.safetensors"), weights)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write(DEMO_MODEL_VERSION)
    try:
        os.rename(tmp, dest)
    except OSError:
        # Another process made it first; theirs is as good as ours.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest


if __name__ == "__main__":
    # python python/pensieve_shim.py make-model SHAPE DEST [DTYPE]
    import sys

    if len(sys.argv) >= 4 and sys.argv[1] == "make-model":
        t0 = time.perf_counter()
        path = make_model(sys.argv[3], sys.argv[2], *(sys.argv[4:5] or []))
        print(f"{path} ready in {time.perf_counter() - t0:.1f}s")
    else:
        sys.exit("usage: pensieve_shim.py make-model {" + ",".join(MODEL_SHAPES) + "} DEST [float32|bfloat16|float16]")

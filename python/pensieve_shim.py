"""pensieve's MLX shim: every call into MLX / mlx-lm lives here.

The Rust binary embeds this file (include_str!) and drives it from exactly one
engine thread. Nothing here starts threads, sockets or servers: Rust owns the
request path, this module owns the model, the tokenizer, the batch generator
and the prompt (prefix) cache.

Data crosses the boundary as plain Python values (ints, strs, tuples) or JSON
strings, so the Rust side never holds Python objects outside its GIL scope.
"""

import copy
import json
import os
import time

import mlx.core as mx
from mlx.utils import tree_flatten

import mlx_lm
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.models.cache import (
    LRUPromptCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import apply_top_k, apply_top_p

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


def make_sampler(temperature, top_p, top_k, seed):
    """One request's sampler. Greedy requests share one object so that the
    batch generator can sample the whole batch in one call."""
    if temperature <= 0.0:
        return _greedy
    state = {"key": mx.random.key(seed) if seed is not None else None}
    inv_temp = 1.0 / temperature

    def sample(logprobs):
        if top_k and top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if state["key"] is None:
            return mx.random.categorical(logprobs * inv_temp)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


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
    """Logits processor: the first generated tokens must be `tokens`."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.step = 0

    def __call__(self, _context, logits):
        i, self.step = self.step, self.step + 1
        if i >= len(self.tokens):
            return logits
        return _only_token(logits, self.tokens[i])


class _Active:
    """Book-keeping for one in-flight request inside the batch."""

    __slots__ = ("rid", "detok", "generated", "fault_after", "splitter", "early_pending")

    def __init__(self, rid, detok, fault_after, splitter):
        self.rid = rid
        self.detok = detok
        self.generated = 0
        self.fault_after = fault_after
        self.splitter = splitter
        # The first token went out early; BatchGenerator will return it again.
        self.early_pending = False


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
        except Exception as e:  # hub failures, bad configs, missing tokenizer
            raise ModelLoadError(f"could not load model {model}: {e}") from e
        self.load_seconds = time.perf_counter() - t0
        self.context_length = int(
            self.config.get("max_position_embeddings")
            or self.config.get("text_config", {}).get("max_position_embeddings")
            or opts.get("default_context", 4096)
        )
        self.model_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        self.max_batch = int(opts.get("max_batch", 8))
        self.prefill_step = int(opts.get("prefill_step", 512))
        self.prefill_batch = int(opts.get("prefill_batch", self.max_batch))
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
        self._new_generator()
        self.active = {}  # uid -> _Active
        self.by_rid = {}  # rid -> uid

    def _new_generator(self):
        self.gen = BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.eos_ids],
            sampler=_greedy,
            completion_batch_size=self.max_batch,
            prefill_batch_size=min(self.prefill_batch, self.max_batch),
            prefill_step_size=self.prefill_step,
        )

    # ---- facts the Rust side reports ------------------------------------

    def info(self):
        return json.dumps(
            {
                "model": self.model_path,
                "model_type": self.config.get("model_type"),
                "context_length": self.context_length,
                "vocab_size": self.config.get("vocab_size"),
                "model_bytes": self.model_bytes,
                "load_seconds": self.load_seconds,
                "eos_token_ids": self.eos_ids,
                "has_chat_template": bool(self.tokenizer.has_chat_template),
                "mlx_version": mx.__version__,
                "device": str(mx.default_device()),
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
            len(self.active),
        )

    # ---- prompts ---------------------------------------------------------

    def render(self, prompt_json):
        """Turn the internal prompt (messages + tools, or a raw prompt) into
        token ids with the model's own chat template."""
        p = json.loads(prompt_json)
        if p.get("raw_prompt") is not None:
            return self.tokenizer.encode(p["raw_prompt"])
        messages = p["messages"]
        kwargs = {}
        if p.get("tools"):
            kwargs["tools"] = p["tools"]
        if self.tokenizer.has_chat_template:
            kwargs.update(self._template_kwargs())
            if p.get("enable_thinking") is not None:
                kwargs[getattr(self.tokenizer, "_thinking_kwarg", "enable_thinking")] = p["enable_thinking"]
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
            return self.tokenizer.encode(text, add_special_tokens=False)
        # No template: a plain transcript, so base models still work.
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        return self.tokenizer.encode(text + "assistant: ")

    # ---- generation ------------------------------------------------------

    def submit(self, rid, tokens, params_json):
        """Queue one request into the running batch. Returns (prompt tokens
        served from the prefix cache, max_tokens after clamping)."""
        p = json.loads(params_json)
        if len(tokens) >= self.context_length:
            raise InvalidPrompt(
                f"prompt is {len(tokens)} tokens; the model's context is {self.context_length}"
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
            processors.append(_ForceTokens(forced))
        (uid,) = self.gen.insert(
            [rest],
            max_tokens=[max_tokens],
            caches=[cache] if cache is not None else None,
            all_tokens=[tokens[:cached]],
            samplers=[make_sampler(p["temperature"], p["top_p"], p["top_k"], p.get("seed"))],
            logits_processors=[processors],
        )
        self.active[uid] = _Active(
            rid, self.tokenizer.detokenizer, p.get("fault_after"), self._splitter(tokens, p)
        )
        # Shortest prompt first: the fewest requests wait behind a long one.
        queue = getattr(self.gen, "_unprocessed_sequences", None)
        if queue is not None and len(queue) > 1:
            ordered = sorted(queue, key=lambda seq: sum(len(seg) for seg in seq[1]))
            queue.clear()
            queue.extend(ordered)
        self.by_rid[rid] = uid
        self._trim_prompt_cache()
        return cached, max_tokens

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

    def _trim_prompt_cache(self):
        active = self.gen.prompt_cache_nbytes
        self.prompt_cache.trim_to(n_bytes=max(0, self.prompt_cache_bytes - active))

    def cancel(self, rid):
        uid = self.by_rid.pop(rid, None)
        if uid is None:
            return
        self.active.pop(uid, None)
        self.gen.remove([uid])

    def has_work(self):
        return bool(self.active)

    def step(self):
        """Advance the batch by one step (a prefill chunk and/or one decode
        token for every running sequence).

        Returns a list of (rid, pieces, finish_reason, error, counts) tuples,
        where pieces is a list of (kind, text) with kind "text", "thinking"
        or "tool" (a JSON {name, arguments}) and `counts` says whether the
        item is a newly generated token. A Python error while handling one
        request's output fails only that request; an error in the shared
        forward pass fails every request in the batch and the generator is
        rebuilt so later requests still run.

        Scheduling on top of mlx-lm's BatchGenerator: while newcomers wait,
        steps prefill them one after another (shortest first) without decode
        steps, for at most `max_decode_stall` seconds, and each newcomer's first
        token is sent as soon as its prefill sampled it, instead of after the
        whole burst's prefill and one more decode step.
        """
        out = []
        try:
            if self._prefill_only():
                responses = self._next_without_decode()
            else:
                _, responses = self.gen.next()
                self._last_decode = time.perf_counter()
            early = self._first_tokens()
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            for a in self.active.values():
                out.append((a.rid, [], None, msg, False))
            self.active.clear()
            self.by_rid.clear()
            self._new_generator()
            return out
        for uid, token in early:
            a = self.active.get(uid)
            if a is not None:
                self._emit(a, token, None, out, early=True)
        finished = []
        for r in responses:
            a = self.active.get(r.uid)
            if a is None:
                continue
            if self._emit(a, r.token, r.finish_reason, out, early=False):
                finished.append(r.uid)
                if r.finish_reason is not None and r.prompt_cache is not None:
                    self.prompt_cache.insert_cache(self.model_path, r.all_tokens[:], r.prompt_cache)
        for uid in finished:
            a = self.active.pop(uid, None)
            if a is not None:
                self.by_rid.pop(a.rid, None)
        if finished:
            self._trim_prompt_cache()
        return out

    def _emit(self, a, token, finish, out, early):
        """Turns one token of one request into an output item. Returns True
        when the request is done (finished or failed)."""
        try:
            if a.early_pending and not early:
                # This token was sent early; only its finish is news now.
                a.early_pending = False
                if finish is None:
                    return False
                a.detok.finalize()
                pieces = a.splitter.feed(a.detok.last_segment) + a.splitter.finish()
                out.append((a.rid, pieces, finish, None, False))
                return True
            a.generated += 1
            if a.fault_after is not None and a.generated > a.fault_after:
                raise RuntimeError(f"injected fault after {a.fault_after} tokens (test hook)")
            if early:
                a.early_pending = True
                if token not in self.eos_set:
                    a.detok.add_token(token)
            elif finish == "stop":
                a.detok.finalize()
            elif finish is not None:
                a.detok.add_token(token)
                a.detok.finalize()
            else:
                a.detok.add_token(token)
            pieces = a.splitter.feed(a.detok.last_segment)
            if finish is not None:
                pieces += a.splitter.finish()
            out.append((a.rid, pieces, finish, None, True))
            return finish is not None
        except Exception as e:
            out.append((a.rid, [], None, f"{type(e).__name__}: {e}", False))
            uid = self.by_rid.get(a.rid)
            if finish is None and uid is not None:
                self.gen.remove([uid])
            return True

    def _prefill_only(self):
        g = self.gen
        try:
            waiting = len(g._unprocessed_sequences) + len(g._prompt_batch)
            running = len(g._generation_batch)
        except AttributeError:  # a different mlx-lm: plain scheduling
            return False
        return waiting > 0 and running > 0 and time.perf_counter() - self._last_decode < self.max_decode_stall

    def _next_without_decode(self):
        """One BatchGenerator step with the running batch set aside: it only
        splits finished prompts into generation and prefills the next chunk;
        the newly started sequences then join the running batch."""
        g = self.gen
        running = g._generation_batch
        g._generation_batch = GenerationBatch.empty(self.model, g.sampler)
        try:
            _, responses = g.next()
        finally:
            fresh = g._generation_batch
            g._generation_batch = running
            if len(fresh):
                running.extend(fresh)
        return responses

    def _first_tokens(self):
        """(uid, first token) of sequences whose prefill just sampled it."""
        g = self.gen
        batch = getattr(g, "_generation_batch", None)
        if batch is None or batch._next_tokens is None:
            return []
        new = [
            (i, uid)
            for i, uid in enumerate(batch.uids)
            if uid in self.active and self.active[uid].generated == 0 and not self.active[uid].early_pending
        ]
        if not new:
            return []
        tokens = batch._next_tokens.tolist()
        return [(uid, tokens[i]) for i, uid in new]


_forward_models = {}


def forward_logits(model_path, tokens):
    """Logits of one forward pass (float32, flattened): a numerical check."""
    if model_path not in _forward_models:
        _forward_models[model_path] = mlx_lm.load(model_path)[0]
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
}


def make_demo_model(dest, shape="demo"):
    """A built-in random-weight model (see make_model)."""
    return make_model(dest, shape)


def make_model(dest, shape="demo", dtype="float32"):
    """Create a model folder at `dest` (atomically), unless it exists: a real
    llama-architecture model with seeded random weights and a byte-level BPE
    tokenizer trained offline. Loads with mlx_lm.load like any model; its
    output is not meaningful text."""
    marker = os.path.join(dest, ".complete")
    if os.path.exists(marker):
        return dest
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from mlx_lm.models import llama

    spec = dict(MODEL_SHAPES[shape])
    think = spec.pop("think", False)
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
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
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
    model = llama.Model(llama.ModelArgs.from_dict(config))
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

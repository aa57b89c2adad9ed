"""The engine: the model, its tokenizer and chat template, the scheduler
(continuous batching over mlx-lm's model and KV caches) and the prefix cache,
driven by the Rust side from exactly one engine thread. Nothing here starts
threads, sockets or servers.

Data crosses the boundary as plain Python values (ints, strs, tuples) or JSON
strings, so the Rust side never holds Python objects outside its GIL scope.
"""

import json
import os
import time

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import (
    LRUPromptCache,
    TokenBuffer,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.utils import maybe_set_recommended_wired_limit

import pensieve_gguf  # registered by the Rust side (src/engine/py.rs), or python/ on sys.path
from pensieve_shim.chat import ChatTemplate, SpecialText
from pensieve_shim import prefix_cache
from pensieve_shim.prefix_cache import compact, cut_back
from pensieve_shim.protocol import InvalidPrompt, Memory, ModelLoadError, Restored, Saved, StepItem, Submitted
from pensieve_shim.sampling import (
    ForceTokens,
    RandomStateGuard,
    ThinkingBudget,
    check_sampling,
    make_sampler,
    poison_random_state,
    raising_sampler,
    sampler_raising_after,
    sampling_defaults,
)
from pensieve_shim import constrain
from pensieve_shim import cpu_kernels
from pensieve_shim import model as model_ops
from pensieve_shim import scheduling
from pensieve_shim import shard as sharding
from pensieve_shim.batch import RunningBatch

def leave_signals_to_rust():
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


leave_signals_to_rust()


def injected_forward_fault(seqs):
    """Test hook (fault injection): a forward pass with a sequence whose
    `fault_forward` threshold is reached raises after it ran."""
    for s in seqs:
        if s.fault_forward is not None and s.generated >= s.fault_forward:
            raise RuntimeError(f"injected fault in a forward pass (request {s.rid}, test hook)")


class Seq:
    """One request inside the engine: its own KV cache while its prompt is
    prefilled, its sampling state, and its output state (detokenizer,
    splitter). Once prefilled it joins the running decode batch."""

    __slots__ = (
        "rid", "detok", "splitter", "fault_after", "fault_forward", "generated", "max_tokens",
        "tokens", "todo", "cache", "sampler", "processors", "context",
        "arrived", "first_sent", "failed", "constraint", "logprobs", "lp_queue",
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
        # Structured output: the grammar state (constrain.Constrained).
        self.constraint = None
        # OpenAI logprobs: alternatives to report per token (None: off), and
        # the (chosen, top) arrays of tokens sampled but not yet emitted.
        self.logprobs = None
        self.lp_queue = []


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
        # Sharded (a distributed group of more than one rank): this rank
        # loads only its shard (see shard.py).
        link = sharding.link() if opts.get("shard") else None
        group = link.group if link is not None and link.size > 1 else None
        self.shard = None
        self.follower = False
        # MLX keeps freed buffers for reuse; bound that cache (from the load
        # on: a shard's whole tensors are freed as it loads) so resident
        # memory tracks the live KV caches instead of past peaks.
        cache_limit = opts.get("mlx_cache_limit")
        if cache_limit is not None:
            mx.set_cache_limit(int(cache_limit))
        try:
            self.model, self.tokenizer, self.config = mlx_lm.load(
                model, return_config=True, lazy=group is not None
            )
            if group is not None:
                if pensieve_gguf.dequantize_if_marked(self.model, model):
                    self.config.pop("quantization", None)
                mode = sharding.shard_model(self.model, self.config, opts["shard"], group)
                sharding.materialize(self.model)
                self.shard = link
                self.shard.mode = mode
                self.follower = group.rank() > 0
                # pensieve's CPU kernels replace whole layers; mlx-lm's
                # sharded layers stay MLX's own.
                self.cpu_kernels = {"used": False, "why": f"sharded ({mode} parallel over {group.size()} ranks)"}
            else:
                # The CPU backend: quantized layers to pensieve's kernels, which
                # keep them quantized; a GGUF conversion's other packed layers
                # (or all of them, with the kernels off) to float32.
                if opts.get("cpu_kernels", True):
                    self.cpu_kernels = cpu_kernels.install(self.model)
                else:
                    self.cpu_kernels = {"used": False, "why": "--cpu-kernels off"}
                if pensieve_gguf.dequantize_if_marked(self.model, model):
                    self.config.pop("quantization", None)
        except ModelLoadError:
            raise
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
        self.model_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters())) + self.cpu_kernels.get("bytes", 0)
        self.max_batch = int(opts.get("max_batch", 8))
        self.prefill_step = int(opts.get("prefill_step", 512))
        self.prompt_cache_bytes = int(opts.get("prompt_cache_bytes", 1 << 30))
        self.eos_ids = sorted(self.tokenizer.eos_token_ids)
        self.eos_set = set(self.eos_ids)
        self.max_decode_stall = float(opts.get("max_decode_stall", 1.0))
        self._last_decode = time.perf_counter()
        if self.shard is None:
            self.prompt_cache = LRUPromptCache(max_size=256, max_bytes=self.prompt_cache_bytes)
            self.persist_dir = opts.get("prompt_cache_dir")
        else:
            self.prompt_cache = sharding.MirroredPromptCache(256, self.prompt_cache_bytes, self.follower)
            # Each rank holds a shard of every entry: saving and restoring
            # them in step is not built yet (the in-memory cache works).
            self.persist_dir = None
        self.sampling_defaults = sampling_defaults(model, opts)
        # Request text that spells a control token stays text (unless the
        # operator allows it: --special-tokens-in-content).
        specials = None
        backend = getattr(self.tokenizer._tokenizer, "backend_tokenizer", None)
        if backend is not None and not opts.get("special_tokens_in_content"):
            specials = SpecialText(backend)
            specials = specials if specials.texts else None
        self.chat = ChatTemplate(self.tokenizer, specials)
        # Metal: keep the weights wired (mlx-lm does the same for its generators).
        maybe_set_recommended_wired_limit()
        # Sequences share decode steps only if this model batches (its caches
        # merge and its attention takes batch masks); otherwise one at a time.
        self._batchable = model_ops.can_batch(self.model)
        self.prefill_batch = max(1, int(opts.get("prefill_batch", 2)))
        self._head = model_ops.find_head(self.model)
        self._kv_peak = 0  # most KV bytes (prefix cache + live) held at once
        self._peak_batch = 0  # most sequences decoded in one step so far
        self._decoded_since_prefill = False
        self.waiting = []  # Seq still prefilling, in arrival order
        self.by_rid = {}  # rid -> Seq
        self.batch = RunningBatch()
        self.leader = sharding.Leader(self, self.shard) if self.shard is not None and not self.follower else None
        if self.shard is not None:
            # Every rank ready before the first operation.
            self.shard.broadcast(b"" if not self.follower else None)

    # ---- prefix cache on disk -------------------------------------------

    def _persist_folder(self):
        return prefix_cache.persist_folder(self.persist_dir, self.model_path, self.config)

    def restore_prompt_cache(self):
        """Loads the entries a previous run saved (see prefix_cache.restore)."""
        if not self.persist_dir:
            return Restored(0, 0, 0, [])
        return prefix_cache.restore(
            self.prompt_cache, self._persist_folder(), self.model_path, self._vocab_size(), self.prompt_cache_bytes
        )

    def _vocab_size(self):
        cfg = self.config.get("text_config", self.config) if "vocab_size" not in self.config else self.config
        v = cfg.get("vocab_size")
        return int(v) if v else len(self.tokenizer._tokenizer)

    def persist_prompt_cache(self):
        """Writes the prefix cache to disk (see prefix_cache.save)."""
        if not self.persist_dir:
            return Saved(0, 0)
        return prefix_cache.save(self.prompt_cache, self.persist_dir, self._persist_folder(), self.model_path)

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
                "cpu_kernels": self.cpu_kernels,
                "batching": self._batchable,
                "sampling_defaults": self.sampling_defaults,
                "thinking": bool(self.tokenizer.has_thinking),
                "late_system": self.chat.late_system_mode(),
                "template": self.chat.template_info(),
                "shard": None if self.shard is None else {
                    "mode": self.shard.mode, "ranks": self.shard.size, "rank": self.shard.rank,
                },
            }
        )

    def memory(self):
        return Memory(
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
        """Token ids of the internal prompt (JSON), through ChatTemplate.render."""
        return self.chat.render(json.loads(prompt_json))

    # ---- generation ------------------------------------------------------

    def submit(self, rid, tokens, params_json, matcher=None):
        """Queue one request into the running batch. Returns (prompt tokens
        served from the prefix cache, max_tokens after clamping). `matcher`:
        the request's grammar state (pensieve_constraints.Matcher), if its
        output is constrained."""
        if self.leader is not None:
            self.leader.tell(["submit", rid, list(tokens), params_json, matcher is not None])
        p = json.loads(params_json)
        if not tokens:
            raise InvalidPrompt("the prompt is empty (no tokens to start from)")
        # The model's context, or less where the request caps it (num_ctx).
        context = min(self.context_length, max(2, int(p.get("context_cap") or self.context_length)))
        if len(tokens) >= context:
            # Anthropic's wording, which Claude Code parses (N and M) to compact
            # the conversation; M leaves room for one generated token.
            raise InvalidPrompt(
                f"prompt is too long: {len(tokens)} tokens > {context - 1} maximum"
            )
        max_tokens = max(1, min(p["max_tokens"], context - len(tokens)))
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
            processors.append(ThinkingBudget(self.tokenizer, budget))
        force = p.get("force_tool")
        if force and p.get("tools") and matcher is None:
            forced = self.chat.forced_call_tokens(p["tools"], force.get("name"))
            if forced is None:
                raise InvalidPrompt("tool_choice: could not derive this model's tool-call opening from its template")
            processors.append(ForceTokens(forced, len(tokens)))
        seq = Seq(
            rid,
            tokens=list(tokens[:cached]),
            todo=list(rest),
            cache=cache if cache is not None else make_prompt_cache(self.model),
            max_tokens=max_tokens,
            sampler=make_sampler(seed=p.get("seed"), **self._sampling(p)),
            processors=processors,
            detok=self.tokenizer.detokenizer,
            splitter=self.chat.splitter(tokens, p),
            fault_after=p.get("fault_after"),
        )
        if matcher is not None and matcher is not sharding.LEADER_CONSTRAINS:
            seq.constraint = constrain.Constrained(matcher, len(tokens), self._think_end_for(seq))
        if p.get("logprobs") is not None and not self.follower:
            seq.logprobs = int(p["logprobs"])
        fault = p.get("fault")
        if p.get("fault_forward_after") is not None:
            seq.fault_forward = int(p["fault_forward_after"])
        if p.get("fault_sampler_after") is not None:
            seq.sampler = sampler_raising_after(seq.sampler, int(p["fault_sampler_after"]))
        if fault == "raise-in-sampler":
            seq.sampler = raising_sampler
        elif fault == "poison-sampling":
            poison_random_state()
        self.waiting.append(seq)
        self.by_rid[rid] = seq
        self._trim_prompt_cache()
        return Submitted(cached, max_tokens)

    def _think_end_for(self, seq):
        """The token that ends the thinking block this sequence starts in
        (its constraint applies after it), or None."""
        tk = self.tokenizer
        if seq.splitter.state != "thinking" or len(tk.think_end_tokens or ()) != 1:
            return None
        return tk.think_end_id

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

    def _active_cache_bytes(self):
        total = sum(c.nbytes for s in self.waiting for c in s.cache)
        if self.batch.cache:
            total += sum(c.nbytes for c in self.batch.cache)
        return total

    def _trim_prompt_cache(self):
        active = self._active_cache_bytes()
        self.prompt_cache.trim_to(n_bytes=max(0, self.prompt_cache_bytes - active))

    def cancel(self, rid):
        if self.leader is not None:
            self.leader.tell(["cancel", rid])
        # Keep what it computed: a client that stops a turn early usually
        # sends the same conversation again.
        self._remove(rid, keep=True)

    def drop(self, rid):
        """A follower: rank 0 no longer runs this request (it failed there
        alone): drop it as rank 0 did, keeping nothing."""
        self._remove(rid, keep=False)

    def _remove(self, rid, keep):
        s = self.by_rid.pop(rid, None)
        if s is None:
            return
        if s in self.waiting:
            self.waiting.remove(s)
        elif s in self.batch.seqs:
            i = self.batch.seqs.index(s)
            if keep:
                try:
                    self.prompt_cache.insert_cache(self.model_path, list(s.tokens), compact(self.batch.cache_of(i)))
                except Exception:
                    pass  # only an optimisation; the sequence leaves the batch regardless
            self.batch.keep([j for j in range(len(self.batch.seqs)) if j != i])
            if keep:
                self._trim_prompt_cache()

    def heartbeat(self):
        """Rank 0, idle: tells the followers it is alive (their watchdog
        bounds the wait for the next operation)."""
        if self.leader is not None:
            self.leader.tell(["ping"])

    def close(self):
        """The engine stops: drop every sequence and wait for MLX's queued
        work (the pipelined next decode step), so nothing computes while the
        process tears the libraries down. Sharded, rank 0 tells the followers
        to stop too (unless the group is already broken)."""
        if self.leader is not None and self.shard.lost is None:
            try:
                self.leader.tell(["close"])
            except sharding.ShardLost:
                pass
        self.waiting.clear()
        self.by_rid.clear()
        self.batch.clear()
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

    # ---- scheduling ------------------------------------------------------

    def step(self, decision=None):
        """One engine step: a prefill chunk of one waiting prompt, or one
        decode token for every running sequence.

        Returns a list of StepItem (protocol.py). A Python error while handling one
        request's output fails only that request; an error in the shared
        decode pass fails the running batch (waiting prompts keep their own
        caches and still run).

        Scheduling: waiting prompts are prefilled shortest first (a prompt
        passed over for `scheduling.STARVATION_S` goes next), up to `prefill_batch` of
        them in one pass (long ones alone, chunk by chunk), and each prompt's
        last logits give its first token, which is sent at once; the sequence
        then joins the decode batch. While prompts wait, the running batch
        pauses for at most `max_decode_stall` seconds between its decode
        steps (then prefill and decode steps take turns), so a burst of
        newcomers gets first tokens early without starving the streams
        already running.
        """
        out = []
        if decision is None:
            decision = self._decide()
            if self.leader is not None and decision is not None:
                self.leader.tell(["step", decision])
        with mx.stream(generation_stream):
            if decision is not None and decision[0] == "prefill":
                self._decoded_since_prefill = False
                self._prefill(out, self.by_rid[decision[1]])
                # A prefill's activations are large and short-lived: give
                # them back rather than keep them in MLX's buffer cache.
                mx.clear_cache()
            elif decision is not None:
                self._decode(out)
        if any(item[2] is not None or item[3] is not None for item in out):
            self._trim_prompt_cache()
        self._kv_peak = max(self._kv_peak, self.prompt_cache.nbytes + self._active_cache_bytes())
        return [StepItem(*item) for item in out]

    def _decide(self):
        """What the next step does: ["prefill", rid] (a chunk of that
        waiting prompt, with the prompts that go with it), ["decode"], or
        None (nothing to run). Sharded, rank 0's decision is every rank's."""
        if self.waiting and self._may_prefill():
            return ["prefill", self._pick().rid]
        if self.batch.seqs:
            return ["decode"]
        return None

    def _may_prefill(self):
        return scheduling.may_prefill(
            len(self.batch.seqs),
            self._batchable,
            self.max_batch,
            time.perf_counter() - self._last_decode,
            self.max_decode_stall,
            self._decoded_since_prefill,
        )

    def _pick(self):
        return scheduling.pick(self.waiting, time.perf_counter())

    def _prefill(self, out, s):
        if len(s.todo) > self.prefill_step:
            # A long prompt: one chunk now, the rest in later steps. Only the
            # cache is evaluated (no logits: the head never runs on it).
            n = self.prefill_step
            try:
                model_ops.forward_hidden(self.model, self._head, mx.array([s.todo[:n]]), s.cache)
                mx.eval([c.state for c in s.cache])
            except Exception as e:
                self._fail([s], e, out)
                return
            s.tokens.extend(s.todo[:n])
            s.todo = s.todo[n:]
            return
        self._prefill_last(self._group(s), out)

    def _group(self, s):
        return scheduling.group(s, self.waiting, self.prefill_batch, self.prefill_step, self._batchable)

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
            logits = model_ops.last_logits(self.model, self._head, x, cache, [n - 1 for n in lengths])
            injected_forward_fault(group)
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
            masks = constrain.masks(group, [[] for _ in group], logits.shape[-1])
            sampled, lps = self._sample(group, logits, None, masks)
            firsts = sampled.tolist()
            self._queue_logprobs(group, lps)
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
                    row, lps = self._sample([s], logits[i : i + 1], None, constrain.masks([s], [[]], logits.shape[-1]))
                    row.tolist()
                    self._queue_logprobs([s], lps)
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
        if self.shard is not None:
            self.shard.raise_if_lost(e)
        msg = f"{type(e).__name__}: {e}"
        for s in seqs:
            if s in self.waiting:
                self.waiting.remove(s)
            self.by_rid.pop(s.rid, None)
            out.append((s.rid, [], None, msg, False))

    def _join(self, seqs, cache, tokens):
        """Adds prefilled sequences to the running batch (see RunningBatch.join)."""
        if not self.batch:
            # The stall window runs from the newest token of any running
            # stream: these just got their first.
            self._last_decode = time.perf_counter()
        self.batch.join(seqs, cache, tokens)
        self._peak_batch = max(self._peak_batch, len(self.batch))

    def _decode(self, out):
        seqs = self.batch.seqs
        inputs = self.batch.next_tokens
        try:
            logits = self.model(inputs[:, None], cache=self.batch.cache)[:, -1, :]
            injected_forward_fault(seqs)
            masks = None
            if any(s.constraint is not None for s in seqs):
                # The forward pass runs while the grammar computes the masks
                # (each needs the token this step feeds).
                mx.async_eval(logits)
                fed = inputs.tolist()
                masks = constrain.masks(seqs, [s.tokens[s.constraint.start:] + [t] if s.constraint else []
                                               for s, t in zip(seqs, fed)], logits.shape[-1])
            sampled, lps = self._sample(seqs, logits, inputs, masks)
            # The next step's tokens compute while this step's are handed out.
            mx.async_eval(sampled)
            tokens = inputs.tolist()
        except Exception as e:
            if self.shard is not None:
                self.shard.raise_if_lost(e)
            if len(seqs) > 1 and self._decode_apart(seqs, inputs, out):
                return
            self._fail(seqs, e, out)
            self.batch.clear()
            return
        self._queue_logprobs(seqs, lps)
        self.batch.next_tokens = sampled
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
                self._finished(seqs[i], self.batch.cache_of(i))
        self.batch.keep(keep)

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
            alone = [(s, self.batch.cache_of(i), inputs[i : i + 1]) for i, s in enumerate(seqs)]
            for s, cache, _ in alone:
                cut_back(cache, len(s.tokens))
        except Exception:
            return False
        for s in seqs:
            if s.context is not None:
                # The failed step may have appended its input token to the
                # context already; the step's rerun appends it again.
                s.context._size = len(s.tokens)
        self.batch.clear()
        rejoin = []
        for s, cache, token in alone:
            self.batch.join([s], cache, token)
            self._decode(out)
            if self.batch.seqs:
                rejoin.append((self.batch.seqs[0], self.batch.cache, self.batch.next_tokens))
            self.batch.clear()
        for s, cache, token in rejoin:
            self._join([s], cache, token)
        return True

    def _sample(self, seqs, logits, inputs, masks=None):
        """Next tokens of `seqs` (one row of `logits` each), through their
        logits processors, their grammar masks (`masks`, see constrain.py)
        and their own samplers; one call for a batch that shares a sampler
        (every greedy request does). An exception leaves MLX's global random
        state as it was (see RandomStateGuard). Returns the tokens and, for
        the sequences that report log-probabilities, {index: (chosen, top)}."""
        with RandomStateGuard():
            sampled, lps = self._sample_unguarded(seqs, logits, inputs, masks)
        if self.shard is not None:
            # Every rank feeds rank 0's tokens (see shard.py).
            sampled = self.shard.agree(sampled)
        return sampled, lps

    def _sample_unguarded(self, seqs, logits, inputs, masks):
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
        if masks is not None:
            logits = constrain.apply(logits, masks)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        first = seqs[0].sampler
        if all(s.sampler is first for s in seqs):
            sampled = first(logprobs)
        else:
            sampled = mx.concatenate([s.sampler(logprobs[i : i + 1]) for i, s in enumerate(seqs)], axis=0)
        return sampled, self._logprobs_of(seqs, logprobs, sampled)

    @staticmethod
    def _logprobs_of(seqs, logprobs, sampled):
        """The log-probabilities the sequences that asked report: of the
        distribution sampled from after processors and grammar masks (before
        temperature and top-k/p truncation), the chosen token's and the top
        alternatives'. Lazy arrays; read when the token is emitted."""
        want = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        if not want:
            return None
        out = {}
        for i in want:
            row = logprobs[i]
            chosen = row[sampled[i]]
            k = seqs[i].logprobs
            top = mx.argpartition(-row, kth=k - 1)[:k] if k > 0 else None
            out[i] = (chosen, top, row[top] if top is not None else None)
        return out

    @staticmethod
    def _queue_logprobs(seqs, lps):
        if lps:
            for i, entry in lps.items():
                seqs[i].lp_queue.append(entry)

    def _finished(self, s, cache):
        """A sequence ended normally: keep its KV cache for prefix reuse."""
        self.by_rid.pop(s.rid, None)
        self.prompt_cache.insert_cache(self.model_path, list(s.tokens), compact(cache))

    def _emit(self, s, token, out):
        """Turns one generated token into an output item. Returns True when
        the request is done (finished or failed)."""
        try:
            s.generated += 1
            if s.fault_after is not None and s.generated > s.fault_after:
                raise RuntimeError(f"injected fault after {s.fault_after} tokens (test hook)")
            if s.constraint is not None and s.constraint.error is not None:
                raise RuntimeError(s.constraint.error)
            logprob = None
            if s.lp_queue:
                chosen, top, top_lp = s.lp_queue.pop(0)
                if token not in self.eos_set:
                    alts = []
                    if top is not None:
                        alts = sorted(zip(top.tolist(), top_lp.tolist()), key=lambda a: -a[1])
                    logprob = (int(token), float(chosen.item()), alts)
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
            out.append((s.rid, pieces, finish, None, True, logprob))
            return finish is not None
        except Exception as e:
            s.failed = True
            self._fail([s], e, out)
            return True

"""Sharded serving: one model over the ranks of an `mx.distributed` group
(ring over TCP, JACCL, MPI: whatever `mx.distributed.init` finds), with
mlx-lm's own sharding (tensor parallel: `model.shard(group)`; pipeline:
`model.model.pipeline(group)`) and MLX's collectives as the only transport.

Rank 0 runs the whole engine and decides everything; the other ranks run the
same Engine as followers. Before each engine operation (a submit, a cancel, a
step, a heartbeat, the close) rank 0 broadcasts it, with the decision the
step is to carry out (prefill this sequence, or decode the batch), so every
rank enters the same forward passes with the same batch, the same inputs and
the same cache layout, and no rank waits on a collective another skipped.
What only rank 0 can decide travels with the next message:

- the prefix-cache entries it evicted (byte budgets differ per rank: a rank
  holds a fraction of each entry), which followers evict in turn;
- the requests still alive (one rank 0 failed on its own, e.g. a grammar
  error only it could see, leaves the followers too).

The sampled tokens are rank 0's: every step's tokens go through an all-sum
to which only rank 0 contributes, inside the step's graph, so followers feed
exactly what rank 0 sampled (constrained decoding, logits processors and
sampling randomness included) and never compute a sampler of their own.

A collective that fails (a peer's connection lost) raises ShardLost; the
Rust side then fails the running requests and every rank exits non-zero. A
rank that stops answering is caught by the Rust side's watchdog (no
operation may take longer than --shard-timeout)."""

import json

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import LRUPromptCache

from pensieve_shim.protocol import ModelLoadError

# Bytes of the first (fixed-size) broadcast: an 8-byte length and the start
# of the message. Most messages (steps, heartbeats) fit; longer ones (a
# submit's prompt) take one more all-sum of exactly the rest.
HEADER = 2048

MODES = ("tensor", "pipeline")


class ShardLost(RuntimeError):
    """A collective failed: a rank of the group is gone."""


class ShardDesync(RuntimeError):
    """A follower's state no longer matches rank 0's (a failure only it saw)."""


# A follower's stand-in for rank 0's grammar matcher: the request is
# constrained (so no forced-call processor is added), but the masks are rank
# 0's business (its sampled tokens are the ones every rank feeds).
LEADER_CONSTRAINS = object()


_LINK = None


def link():
    """This process's Link to its group (made once: `mx.distributed.init`
    reads the rank and the backend's settings from the environment that
    `mlx.launch` or `pensieve --ranks` set)."""
    global _LINK
    if _LINK is None:
        _LINK = Link(mx.distributed.init(), generation_stream)
    return _LINK


class Link:
    """Rank 0's messages to every rank, over the group's all-sum."""

    def __init__(self, g, stream):
        self.group = g
        self.rank = g.rank()
        self.size = g.size()
        self.stream = stream
        self.lost = None

    def _sum(self, a):
        out = mx.distributed.all_sum(mx.array(a), group=self.group, stream=self.stream)
        return np.array(out)

    def broadcast(self, payload=None):
        """Rank 0 passes `payload` (bytes); every rank gets it back."""
        if self.lost is not None:
            raise ShardLost(self.lost)
        try:
            head = np.zeros(HEADER, np.uint8)
            if self.rank == 0:
                n = len(payload)
                head[:8] = np.frombuffer(n.to_bytes(8, "little"), np.uint8)
                k = min(n, HEADER - 8)
                head[8 : 8 + k] = np.frombuffer(payload[:k], np.uint8)
            got = self._sum(head)
            n = int.from_bytes(got[:8].tobytes(), "little")
            data = got[8 : 8 + min(n, HEADER - 8)].tobytes()
            if n > HEADER - 8:
                if self.rank == 0:
                    rest = np.frombuffer(payload[HEADER - 8 :], np.uint8)
                else:
                    rest = np.zeros(n - (HEADER - 8), np.uint8)
                data += self._sum(rest).tobytes()
            return data
        except RuntimeError as e:
            self.lost = f"{e}"
            raise ShardLost(f"a rank of the group is gone: {e}") from e

    def raise_if_lost(self, e):
        """A step's error that is the group's (a collective failed: MLX's
        backends prefix theirs with their name) is no request's: raises
        ShardLost, which ends the engine, instead of failing requests one by
        one with it."""
        text = str(e)
        if isinstance(e, ShardLost):
            raise e
        if isinstance(e, RuntimeError) and text.startswith(("[ring]", "[jaccl]", "[mpi]", "[nccl]")):
            self.lost = text
            raise ShardLost(f"a rank of the group is gone: {text}") from e

    def agree(self, tokens):
        """`tokens` as rank 0 sampled them, on every rank (lazy: part of the
        step's graph). Followers contribute zeros; theirs still depend on the
        step's forward pass, so evaluating the tokens runs the same
        collectives on every rank, in the same order."""
        mine = tokens if self.rank == 0 else tokens * 0
        return mx.distributed.all_sum(mine, group=self.group)


class MirroredPromptCache(LRUPromptCache):
    """The prefix cache on a sharded engine. On rank 0 it evicts as usual
    and records each eviction with the number of inserts made so far; on a
    follower it never evicts on its own (its entries hold a fraction of the
    bytes) and applies rank 0's evictions instead, to the same entries: the
    same inserts happen on every rank, in the same order."""

    def __init__(self, max_size, max_bytes, follower):
        huge = 1 << 62
        super().__init__(max_size=huge if follower else max_size, max_bytes=huge if follower else max_bytes)
        self.follower = follower
        self.inserts = 0
        self.evicted = []
        if not follower:
            pop = self._lru.pop

            def recording_pop():
                model, tokens = pop()
                self.evicted.append((list(tokens), self.inserts))
                return model, tokens

            self._lru.pop = recording_pop

    def insert_cache(self, model, tokens, prompt_cache, **kw):
        self.inserts += 1
        super().insert_cache(model, tokens, prompt_cache, **kw)
        if self.follower:
            try:
                self._trie.get(model, tokens).inserted = self.inserts
            except KeyError:
                pass

    def trim_to(self, **kw):
        if not self.follower:
            super().trim_to(**kw)

    def take_evictions(self):
        out, self.evicted = self.evicted, []
        return out

    def evict(self, model, tokens, before):
        """Follower: drops the entry for `tokens` if it is the one rank 0
        evicted (inserted at or before rank 0's `before`-th insert)."""
        try:
            entry = self._trie.get(model, tokens)
        except KeyError:
            return
        if getattr(entry, "inserted", 0) > before:
            return
        self._lru.remove(model, tokens)
        self._trie.pop(model, tokens)
        self._n_bytes -= entry.nbytes
        self._n_bytes_by_type[entry.cache_type] -= entry.nbytes


def shard_model(model, config, mode, g):
    """Shards a lazily loaded model over `g` with mlx-lm's own methods.
    Returns the mode used. A family mlx-lm cannot shard is a load error
    naming it and the modes that exist."""
    family = config.get("model_type", "?")
    tensor = hasattr(model, "shard")
    pipeline = hasattr(model, "model") and hasattr(model.model, "pipeline")
    have = [m for m, ok in (("tensor", tensor), ("pipeline", pipeline)) if ok]
    if mode == "auto":
        if not have:
            raise ModelLoadError(
                f"mlx-lm cannot shard the {family!r} family (it has neither tensor parallelism, `Model.shard`, "
                f"nor pipeline parallelism, `model.pipeline`); sharded modes are: {', '.join(MODES)}"
            )
        mode = have[0]
    if mode not in MODES:
        raise ModelLoadError(f"unknown shard mode {mode!r}; the modes are: {', '.join(MODES)}")
    if mode not in have:
        raise ModelLoadError(
            f"mlx-lm cannot shard the {family!r} family in {mode} mode; "
            + (f"it supports: {', '.join(have)}" if have else "it supports no sharded mode")
            + f" (modes: {', '.join(MODES)})"
        )
    n = g.size()
    if mode == "tensor":
        args = config.get("text_config", config)
        heads, kv = args.get("num_attention_heads"), args.get("num_key_value_heads") or args.get("num_attention_heads")
        for what, v in (("attention heads", heads), ("key/value heads", kv)):
            if v is not None and int(v) % n:
                raise ModelLoadError(
                    f"tensor parallelism splits the {what} over the ranks: {family!r} has {v}, not divisible by {n} ranks"
                    + (" (try --shard pipeline)" if pipeline else "")
                )
        model.shard(g)
    else:
        layers = len(model.model.layers)
        if layers < n:
            raise ModelLoadError(f"pipeline parallelism needs a layer per rank: {family!r} has {layers}, the group {n}")
        model.model.pipeline(g)
    return mode


def materialize(model):
    """Reads this rank's shard from the lazily loaded weights, one layer at a
    time: each of a layer's tensors is read whole and cut to this rank's
    part, and the whole ones are freed before the next layer, so the peak is
    the shard plus one layer, not the model."""
    for layer in getattr(model, "layers", None) or []:
        if layer is not None:
            mx.eval(layer.parameters())
            mx.clear_cache()
    mx.eval(model.parameters())
    mx.clear_cache()


class Leader:
    """Rank 0's side: tells every rank each operation before running it."""

    def __init__(self, engine, link):
        self.engine = engine
        self.link = link

    def tell(self, op):
        e = self.engine
        msg = {"op": op, "live": sorted(e.by_rid), "evicted": e.prompt_cache.take_evictions()}
        self.link.broadcast(json.dumps(msg, separators=(",", ":")).encode())


def hello(link, spec, options_json):
    """Rank 0 tells the followers what to load (before any rank loads)."""
    link.broadcast(json.dumps({"spec": spec, "options": options_json}).encode())


def await_hello(link):
    """A follower waits for rank 0's hello: (model spec, options JSON)."""
    msg = json.loads(link.broadcast(None))
    return msg["spec"], msg["options"]


class Follower:
    """A rank > 0: runs each operation rank 0 broadcasts on its own Engine."""

    def __init__(self, engine):
        self.engine = engine
        self.link = engine.shard

    def serve_one(self):
        """Runs the next operation. Returns False after the close."""
        e = self.engine
        msg = json.loads(self.link.broadcast(None))
        for tokens, before in msg["evicted"]:
            e.prompt_cache.evict(e.model_path, tokens, before)
        live = set(msg["live"])
        for rid in [r for r in e.by_rid if r not in live]:
            e.drop(rid)
        if len(e.by_rid) != len(live):
            raise ShardDesync(f"rank {self.link.rank} lost requests rank 0 still runs: {sorted(live - set(e.by_rid))}")
        op = msg["op"]
        kind = op[0]
        if kind == "submit":
            _, rid, tokens, params, constrained = op
            try:
                e.submit(rid, tokens, params, LEADER_CONSTRAINS if constrained else None)
            except Exception:
                pass  # rank 0 raised the same (its client got the error)
        elif kind == "cancel":
            e.cancel(op[1])
        elif kind == "step":
            e.step(op[1])
        elif kind == "close":
            e.close()
            return False
        elif kind != "ping":
            raise ShardDesync(f"unknown operation from rank 0: {kind!r}")
        return True

"""The sharded prefix cache (pensieve_shim/shard.py, MirroredPromptCache):
rank 0 evicts by its own byte budget; a follower, whose entries hold a
fraction of the bytes, evicts exactly the entries rank 0 did (including when
rank 0 evicted an entry and later inserted the same tokens again), so both
answer every lookup alike."""
import random

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from pensieve_shim.shard import MirroredPromptCache


def kv(n_tokens, heads):
    c = KVCache()
    c.update_and_fetch(mx.zeros((1, heads, n_tokens, 4)), mx.zeros((1, heads, n_tokens, 4)))
    return [c]


def keys(cache):
    return sorted(tuple(t) for lru in cache._lru._lrus.values() for _, t in lru)


def replay(ops, leader_budget, max_size=256):
    """Runs `ops` (insert tokens / trim to bytes) on a rank 0 (2 heads per
    entry) and a follower (1 head: half the bytes), passing rank 0's
    evictions after each op as the follower's next message would."""
    leader = MirroredPromptCache(max_size, leader_budget, follower=False)
    follower = MirroredPromptCache(max_size, leader_budget, follower=True)
    for op in ops:
        if op[0] == "insert":
            # One engine operation may insert several entries (a step that
            # finishes several sequences): evictions reach the follower after.
            for tokens in op[1:]:
                leader.insert_cache("m", list(tokens), kv(len(tokens), 2))
                follower.insert_cache("m", list(tokens), kv(len(tokens), 1))
        else:
            leader.trim_to(n_bytes=op[1])
            follower.trim_to(n_bytes=op[1])
        for tokens, before in leader.take_evictions():
            follower.evict("m", tokens, before)
        assert keys(follower) == keys(leader), op
        probe = list(op[-1]) + [7] if op[0] == "insert" else [1, 2, 3]
        a, b = leader.fetch_nearest_cache("m", probe), follower.fetch_nearest_cache("m", probe)
        assert (a[0] is None) == (b[0] is None) and a[1] == b[1]
    return leader, follower


def test_a_follower_evicts_what_rank_0_evicts():
    rng = random.Random(3)
    ops = []
    for _ in range(300):
        if rng.random() < 0.15:
            ops.append(("trim", rng.randint(0, 40000)))
        else:
            entries = []
            for _ in range(rng.randint(1, 3)):
                base = rng.choice([[1, 2], [1, 3], [5], [9, 9, 9]])
                entries.append(tuple(base + [rng.randint(10, 30) for _ in range(rng.randint(1, 60))]))
            ops.append(("insert", *entries))
    leader, follower = replay(ops, leader_budget=60000, max_size=12)
    assert leader.nbytes == 2 * follower.nbytes
    assert len(leader) > 0


def test_an_entry_evicted_then_inserted_again_stays():
    big = tuple(range(100, 400))
    # In one operation, the second insert evicts the first entry (over
    # budget) and the third inserts its tokens again: the follower, told of
    # the eviction after all three, must keep the new entry.
    ops = [("insert", (1, 2, 3)), ("insert", big, (1, 2, 3))]
    leader, follower = replay(ops, leader_budget=kv(300, 2)[0].nbytes + 10)
    assert keys(leader) == keys(follower) == [(1, 2, 3)]

"""The running decode batch as its own type, its invariants in one place."""

import mlx.core as mx


class RunningBatch:
    """The sequences that decode together, one token each per step.

    Invariants:
    - `seqs[i]` is row i of `cache` (every layer) and of `next_tokens`;
    - one sequence runs on its own per-layer caches (`batched` False: no
      padding, no masks); several run on merged batch caches (`batched`
      True); the switch happens in `join` and `keep`, nowhere else;
    - empty: `seqs` is [], `cache` and `next_tokens` are None;
    - a sequence in the batch holds no cache of its own (`seq.cache` None):
      `cache_of(i)` extracts it when it leaves.
    """

    def __init__(self):
        self.clear()

    def clear(self):
        self.seqs = []
        self.cache = None
        self.batched = False
        self.next_tokens = None

    def __len__(self):
        return len(self.seqs)

    def __bool__(self):
        return bool(self.seqs)

    def join(self, seqs, cache, tokens):
        """Adds prefilled sequences with their cache (plain for one, a batch
        cache for several) and the tokens their next step feeds."""
        batched = len(seqs) > 1
        if not self.seqs:
            self.cache = cache
            self.batched = batched
            self.next_tokens = tokens
        else:
            if not self.batched:
                self.cache = [c.merge([c]) for c in self.cache]
                self.batched = True
            new = cache if batched else [c.merge([c]) for c in cache]
            for ca, cb in zip(self.cache, new):
                ca.extend(cb)
            self.next_tokens = mx.concatenate([self.next_tokens, tokens])
        self.seqs.extend(seqs)
        for s in seqs:
            s.cache = None

    def cache_of(self, i):
        """The cache of the sequence at `i`, on its own."""
        return [c.extract(i) for c in self.cache] if self.batched else self.cache

    def keep(self, keep):
        """Shrinks the batch to the sequences at indices `keep`."""
        if not keep:
            self.clear()
            return
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        self.next_tokens = self.next_tokens[mx.array(keep)]
        if len(keep) == 1:
            # Alone again: back to plain caches (no padding, no masks).
            self.cache = [c.extract(keep[0]) for c in self.cache]
            self.batched = False
        else:
            for c in self.cache:
                c.filter(keep)

"""Constrained sequences (structured outputs, strict and forced tool calls).

A constrained sequence holds a grammar matcher made by the Rust side from
its request's compiled grammar (src/constrain.rs; the `pensieve_constraints`
module). Before each sampling, the matchers of a batch's constrained rows
consume the tokens generated since their last mask and compute the next
one, in Rust with the GIL released; the masks then go to their logits rows.
Rows without a constraint are left as they are (a batch without any pays
nothing at all)."""

import mlx.core as mx
import numpy as np


class Constrained:
    """One sequence's grammar state. Generated tokens are counted from the
    prompt's end (`start` in the sequence's tokens); the matcher takes each
    one exactly once (a step run again after a failure finds nothing new).
    With `think_end` set the sequence opened a thinking block: the grammar
    applies from the token after the block's end."""

    __slots__ = ("matcher", "start", "fed", "think_end", "active", "error")

    def __init__(self, matcher, start, think_end=None):
        self.matcher = matcher
        self.start = start
        self.fed = 0
        self.think_end = think_end
        self.active = think_end is None
        self.error = None

    def pending(self, generated):
        """The tokens of `generated` the matcher has not seen, or None while
        the constraint does not apply yet (inside the thinking block)."""
        new = generated[self.fed:]
        self.fed = len(generated)
        if self.active:
            return new
        if self.think_end in new:
            self.active = True
            return new[new.index(self.think_end) + 1:]
        return None


def masks(seqs, generated, n_vocab):
    """The token masks of `seqs` (bool, one row each; None when no row is
    constrained now). `generated[i]`: the tokens seqs[i] generated so far."""
    matchers, tokens = [], []
    for s, gen in zip(seqs, generated):
        c = s.constraint
        new = None if c is None or c.error is not None else c.pending(gen)
        matchers.append(None if new is None else c.matcher)
        tokens.append(new or [])
    if all(m is None for m in matchers):
        return None
    # Registered by the Rust side (src/engine/py/constraints.rs); imported
    # here so the package also loads from disk (make_model.py, unit tests).
    import pensieve_constraints

    rows, errors = pensieve_constraints.masks(matchers, tokens, n_vocab)
    for s, e in zip(seqs, errors):
        if e is not None:
            s.constraint.error = e
    return mx.array(np.frombuffer(rows, dtype=np.uint8).reshape(len(seqs), n_vocab)).astype(mx.bool_)


def apply(logits, mask):
    """`logits` with the tokens `mask` forbids at -inf (rows it allows in
    full keep their values bit for bit)."""
    return mx.where(mask, logits, mx.array(-float("inf"), dtype=logits.dtype))

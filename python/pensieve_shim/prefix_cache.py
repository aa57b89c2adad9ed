"""The prefix (prompt) cache's storage: exact-size copies of KV caches,
cutting them back, and the checks a saved entry passes before it is restored.
The only module that reaches into mlx-lm's cache internals."""

import os
import stat

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import KVCache

def cut_back(cache, n):
    """Each layer's cache back to `n` positions (a failed pass may have
    advanced some layers and not others)."""
    for c in cache:
        offset = getattr(c, "offset", None)
        if isinstance(offset, int) and offset > n and c.is_trimmable():
            c.trim(offset - n)


def tighten(path, mode):
    """chmod to `mode` unless already there (umask-independent permissions)."""
    if stat.S_IMODE(os.lstat(path).st_mode) != mode:
        os.chmod(path, mode)


def unsafe_folder(path, st):
    """Why a prefix-cache folder must not be trusted, or None."""
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a plain folder"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def check_entry(tokens, cache, vocab):
    """A restored entry's token ids must be ids of this model, one per
    position of its KV cache."""
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("its token list is missing or empty")
    if not all(type(t) is int and 0 <= t < vocab for t in tokens):
        raise ValueError(f"its token ids are not all integers in [0, {vocab})")
    for c in cache:
        if isinstance(c, KVCache) and c.offset != len(tokens):
            raise ValueError(f"it has {len(tokens)} token ids for {c.offset} cached positions")


def own_copy(x):
    return x * 1 if isinstance(x, mx.array) else x


def compact(cache):
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
                c.state = tree_map(own_copy, c.state)
            except (AttributeError, TypeError, ValueError):
                pass
    mx.eval([c.state for c in cache])
    return cache


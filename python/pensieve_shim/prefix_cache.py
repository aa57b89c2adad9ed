"""The prefix (prompt) cache's storage: exact-size copies of KV caches,
cutting them back, and the checks a saved entry passes before it is restored.
The only module that reaches into mlx-lm's cache internals."""

import hashlib
import json
import os
import shutil
import stat

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import KVCache, load_prompt_cache, save_prompt_cache

from pensieve_shim.protocol import Restored, Saved

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



def persist_folder(persist_dir, model_path, config):
    """A model's folder under the prompt-cache directory: the name is a
    fingerprint of the model (path, config, weight files), so entries are
    only ever restored into the model that computed them."""
    h = hashlib.sha256()
    h.update(model_path.encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    if os.path.isdir(model_path):
        for f in sorted(os.listdir(model_path)):
            if f.endswith(".safetensors"):
                st = os.stat(os.path.join(model_path, f))
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return os.path.join(persist_dir, h.hexdigest()[:16])


def restore(cache, folder, model_key, vocab, budget):
    """Loads the entries a previous run saved in `folder` into `cache` (an
    mlx-lm LRUPromptCache; oldest first, so the LRU order survives), up to
    `budget` bytes. Returns Restored.

    The folder holds conversations, so what is read from it is checked:
    the folder must be this user's and writable by no one else, only
    regular files are opened (a planted FIFO would block the read, a
    symlink could point anywhere), and an entry's token ids must be
    integers below the vocabulary size, as many as its KV length."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return Restored(0, 0, 0, [])
    problem = unsafe_folder(folder, st)
    if problem:
        return Restored(0, 0, 0, [f"not restoring the prefix cache: {problem}"])
    tighten(folder, 0o700)
    n = skipped = 0
    warnings = []
    for f in sorted(os.listdir(folder)):
        path = os.path.join(folder, f)
        if not f.endswith(".safetensors"):
            continue
        try:
            fst = os.lstat(path)
            if not stat.S_ISREG(fst.st_mode):
                raise ValueError("not a regular file (symlink, FIFO or device): not opened")
            tighten(path, 0o600)
            entry, meta = load_prompt_cache(path, return_metadata=True)
            tokens = json.loads(meta["tokens"])
            check_entry(tokens, entry, vocab)
            if sum(c.nbytes for c in entry) + cache.nbytes > budget:
                skipped += 1
                continue
            cache.insert_cache(model_key, tokens, entry, cache_type=meta.get("cache_type", "assistant"))
            n += 1
        except Exception as e:
            skipped += 1
            warnings.append(f"skipped prefix-cache entry {path}: {e}")
    return Restored(n, int(cache.nbytes), skipped, warnings)


def save(cache, persist_dir, folder, model_key):
    """Writes `cache`'s entries for `model_key` to `folder` (replacing the
    previous set) so a restart keeps warm prefixes. Folders are 0700 and
    files 0600 whatever the umask: they hold conversations. Returns Saved."""
    os.makedirs(persist_dir, mode=0o700, exist_ok=True)
    tighten(persist_dir, 0o700)
    # Leftovers of a save that was killed midway.
    parent, name = os.path.split(folder)
    if os.path.isdir(parent):
        for f in os.listdir(parent):
            if f.startswith((f"{name}.tmp-", f"{name}.old-")):
                shutil.rmtree(os.path.join(parent, f), ignore_errors=True)
    tmp = f"{folder}.tmp-{os.getpid()}"
    os.makedirs(tmp, mode=0o700)
    tighten(tmp, 0o700)
    lru = cache._lru
    n = nbytes = 0
    # Oldest first across the LRU's queues: restored in this order, the
    # most recent entries are the last evicted.
    entries = [(model, tokens, kind) for kind in reversed(lru._ordering) for model, tokens in lru._lrus[kind]]
    for model, tokens, kind in entries:
        if model != model_key:
            continue
        entry = cache._trie.get(model, tokens)
        path = os.path.join(tmp, f"{n:06d}.safetensors")
        save_prompt_cache(path, entry.prompt_cache, {"tokens": json.dumps(list(tokens)), "cache_type": kind})
        tighten(path, 0o600)
        n += 1
        nbytes += entry.nbytes
    old = f"{folder}.old-{os.getpid()}"
    if os.path.isdir(folder):
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return Saved(n, nbytes)

"""The scheduling policy, stated in one place and free of MLX: when a step
may prefill, which waiting prompt goes next, and which prompts share its
prefill pass. The engine (engine.py) applies it; python/tests test it."""

# How long a waiting prompt may be passed over by shorter ones before it is
# prefilled next regardless (shortest-first would otherwise starve it).
STARVATION_S = 10.0


def may_prefill(running, batchable, max_batch, since_decode, max_stall, decoded_since_prefill):
    """Whether this step may prefill rather than decode. Prefill while nothing
    runs, within the stall window after a decode step (`since_decode` <
    `max_stall` seconds), and otherwise in turns with decode steps (one
    prefill step after each decode step), so neither side starves. Never
    while the batch is full or the model cannot batch."""
    if not running:
        return True
    if not batchable or running >= max_batch:
        return False
    if since_decode < max_stall:
        return True
    return decoded_since_prefill


def pick(waiting, now, starvation_s=STARVATION_S):
    """The waiting prompt to prefill next (`waiting` in arrival order, each
    with `todo` and `arrived`): the shortest, unless the oldest has waited
    longer than `starvation_s`."""
    oldest = waiting[0]
    if now - oldest.arrived > starvation_s:
        return oldest
    return min(waiting, key=lambda s: len(s.todo))


def group(first, waiting, prefill_batch, prefill_step, batchable):
    """`first` plus the shortest other waiting prompts that fit in one chunk,
    up to `prefill_batch` in all, while right padding stays under a quarter
    of the real tokens."""
    out = [first]
    if prefill_batch <= 1 or not batchable:
        return out
    longest, total = len(first.todo), len(first.todo)
    for c in sorted(waiting, key=lambda w: len(w.todo)):
        if len(out) >= prefill_batch:
            break
        if c is first or len(c.todo) > prefill_step:
            continue
        L = max(longest, len(c.todo))
        if L * (len(out) + 1) > 1.25 * (total + len(c.todo)):
            continue
        out.append(c)
        longest, total = L, total + len(c.todo)
    return out

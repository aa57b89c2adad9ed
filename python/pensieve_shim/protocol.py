"""The Rust/Python boundary's types. Results are NamedTuples the Rust side
reads by field name (src/engine/py.rs: `#[derive(FromPyObject)]`); the
exceptions are classes it matches with `isinstance`."""

from typing import List, NamedTuple, Optional, Tuple

class ModelLoadError(Exception):
    """Raised when --model does not name a loadable model."""


class InvalidPrompt(Exception):
    """The request cannot run as asked (e.g. the prompt leaves no room in the context): a client error."""



class Submitted(NamedTuple):
    """A request queued: prompt tokens served from the prefix cache, and
    max_tokens after clamping to the context."""

    cached_tokens: int
    max_tokens: int


class StepItem(NamedTuple):
    """One request's output from one engine step. `pieces`: (kind, text)
    with kind "text", "thinking" or "tool" (JSON {name, arguments});
    `finish`: "stop" (EOS) or "length"; `error`: the exception that failed
    this request; `counts`: whether this is a newly generated token;
    `logprob`: (token, log-probability, [(token, log-probability), ...]
    alternatives) when the request asked for log-probabilities."""

    rid: int
    pieces: List[Tuple[str, str]]
    finish: Optional[str]
    error: Optional[str]
    counts: bool
    logprob: Optional[Tuple[int, float, List[Tuple[int, float]]]] = None


class Memory(NamedTuple):
    mlx_active_bytes: int
    mlx_peak_bytes: int
    mlx_cache_bytes: int
    prompt_cache_bytes: int
    running_sequences: int
    live_kv_bytes: int
    kv_peak_bytes: int
    peak_batch: int


class Restored(NamedTuple):
    """Prefix-cache entries loaded at start, and why any were not."""

    entries: int
    bytes: int
    skipped: int
    warnings: List[str]


class Saved(NamedTuple):
    entries: int
    bytes: int

"""pensieve's MLX side: every call into MLX / mlx-lm lives in this package.

The Rust binary embeds these files (src/engine/py.rs registers each module
under its dotted name) and drives the engine from exactly one thread; the
same files run from python/ on disk for the benches, the training script and
the tests. Modules, each importing only those above it:

  protocol      the exceptions the Rust side tells apart
  sampling      samplers, logits processors, sampling defaults, their test hooks
  splitter      decoded text -> text / thinking / tool calls
  chat          control-token text kept as text
  prefix_cache  exact-size KV copies and the checks saved entries pass
  scheduling    the scheduling policy: when to prefill, what next, what together
  batch         the running decode batch and its invariants
  model         forward passes (the head on chosen positions) and the load-time probes
  shard         one model over the ranks of an mx.distributed group: rank 0 leads, the others follow
  modelmaker    the built-in random-weight models and benchmark shapes (imported
                only when one is asked for)
  engine        the model, the scheduler and the prefix cache: the Engine facade
"""

from pensieve_shim.engine import Engine, Seq
from pensieve_shim.model import forward_logits
from pensieve_shim.protocol import InvalidPrompt, ModelLoadError
from pensieve_shim.sampling import check_sampling
from pensieve_shim.splitter import Splitter

__all__ = [
    "DEMO_MODEL_VERSION",
    "Engine",
    "InvalidPrompt",
    "MODEL_SHAPES",
    "ModelLoadError",
    "Seq",
    "Splitter",
    "check_sampling",
    "forward_logits",
    "generated_model_key",
    "make_demo_model",
    "make_model",
]

_MODELMAKER = ("DEMO_MODEL_VERSION", "MODEL_SHAPES", "generated_model_key", "make_demo_model", "make_model")


def __getattr__(name):
    # The model maker (and the tokenizer trainer it pulls in) loads on first use.
    if name in _MODELMAKER:
        from pensieve_shim import modelmaker

        return getattr(modelmaker, name)
    raise AttributeError(f"module 'pensieve_shim' has no attribute {name!r}")

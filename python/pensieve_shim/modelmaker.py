"""Models made on this machine: the built-in random-weight models (seeded
weights, a byte-level BPE tokenizer trained offline) and the benchmark
shapes. Used only when one is asked for."""

import hashlib
import json
import os
import time

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten

# v2: the tokenizer config names its tool-call format (json_tools), so tool
# calls are parsed and can be constrained.
DEMO_MODEL_VERSION = "demo-v2"

# ---- the built-in demo model ---------------------------------------------

_DEMO_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif -%}"
    "# Tools\nYou may call one or more functions. Function signatures:\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "To call a function, reply with <tool_call>{\"name\": <name>, \"arguments\": <args-json>}</tool_call>"
    "<|im_end|>\n"
    "{%- elif messages and messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{%- else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}"
    "{%- if message.get('tool_calls') %}{%- for tc in message['tool_calls'] %}"
    "\n<tool_call>{\"name\": \"{{ tc['function']['name'] }}\", \"arguments\": {{ tc['function']['arguments'] | tojson }}}</tool_call>"
    "{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

# The demo template with Qwen3-Coder-style calls (arguments as XML
# parameters, parsed by mlx-lm's qwen3_coder parser), for "demo-coder".
_JSON_CALL = (
    "\n<tool_call>{\"name\": \"{{ tc['function']['name'] }}\", \"arguments\": {{ tc['function']['arguments'] | tojson }}}</tool_call>"
)
_CODER_CALL = (
    "\n<tool_call>\n<function={{ tc['function']['name'] }}>\n"
    "{% for k, v in tc['function']['arguments'].items() %}<parameter={{ k }}>\n"
    "{% if v is mapping or (v is iterable and v is not string) %}{{ v | tojson }}{% else %}{{ v }}{% endif %}"
    "\n</parameter>\n{% endfor %}</function>\n</tool_call>"
)
# LFM2-style Python calls, for "demo-pythonic".
_PYTHONIC_CALL = (
    "\n<|tool_call_start|>[{{ tc['function']['name'] }}("
    "{% for k, v in tc['function']['arguments'].items() %}{{ k }}={{ v | tojson }}{% if not loop.last %}, {% endif %}{% endfor %}"
    ")]<|tool_call_end|>"
)
_CALLS = {"json_tools": _JSON_CALL, "qwen3_coder": _CODER_CALL, "pythonic": _PYTHONIC_CALL}
assert _JSON_CALL in _DEMO_TEMPLATE

# Appended to the demo template for "demo-think": the generation prompt opens
# a thinking block unless the request turns thinking off.
_THINK_SUFFIX = (
    "{%- if add_generation_prompt and (enable_thinking is not defined or enable_thinking) %}<think>\n{%- endif %}"
)

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu "
    "the a an and or of to in on for with is are was were be it this that you I we they "
    "hello world weather sunny rain cloudy wind city today tomorrow temperature degrees "
    "function call tool result error file read write edit bash search agent code test "
    "name arguments description type object string number boolean array properties required "
    "system user assistant model token prompt cache server request response stream message"
).split()


def _demo_corpus():
    import random

    rng = random.Random(1234)
    lines = []
    for _ in range(4000):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", ";"]))
    lines.append('{"name": "get_weather", "arguments": {"city": "Paris"}} [1, 2, 3] <tool_call></tool_call>')
    lines.append("0123456789 ()[]{}<>/\\|-_=+*&^%$#@~`'\" é ü ñ 你好 😀")
    return lines


def _bench_corpus():
    """A large synthetic corpus (Zipf-distributed pseudo-words) so that BPE
    training reaches a realistic vocabulary size."""
    import random

    rng = random.Random(4321)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ea")]
    lexicon = list(_WORDS)
    while len(lexicon) < 30000:
        lexicon.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    lines = _demo_corpus()
    for _ in range(60000):
        words = rng.choices(lexicon, weights, k=rng.randint(6, 20))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    return lines


# Architecture presets (llama family). "demo" is the built-in model; the
# others give benchmark-realistic shapes with random weights.
MODEL_SHAPES = {
    "demo": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo"),
    # The same with <think>/</think> tokens and a template that opens a
    # thinking block (as Qwen3's does): for testing thinking end to end.
    "demo-think": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", think=True),
    # The same with Qwen3-Coder-style tool calls (XML parameters), and with
    # LFM2-style Python calls.
    "demo-coder": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", calls="qwen3_coder"),
    "demo-pythonic": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", calls="pythonic"),
    # SmolLM-135M's shape with an 8k vocabulary.
    "smollm-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                        num_attention_heads=9, num_key_value_heads=3, vocab=8192, corpus="bench"),
    "smollm-360m": dict(hidden_size=960, num_hidden_layers=32, intermediate_size=2560,
                        num_attention_heads=15, num_key_value_heads=5, vocab=8192, corpus="bench"),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                     num_attention_heads=32, num_key_value_heads=8, vocab=8192, corpus="bench"),
    # A Gemma-2-architecture demo: its attention (logit soft-capping) cannot
    # take batch masks, so it exercises one-at-a-time serving.
    # The demo shape in the other GGUF architectures (tests of the GGUF path).
    "demo-qwen2": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", arch="qwen2"),
    "demo-qwen3": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", arch="qwen3"),
    "demo-gemma2": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=2, vocab=768, corpus="demo", arch="gemma2",
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16),
}


def make_demo_model(dest, shape="demo"):
    """A built-in random-weight model (see make_model)."""
    return make_model(dest, shape)


def generated_model_key(shape):
    """The folder name of a generated model: everything that decides its
    weights and tokenizer (its shape, this generator's version, the MLX,
    mlx-lm and tokenizers versions that seed, initialise and train it), so
    an upgrade never serves a folder another version made."""
    import tokenizers

    made_by = json.dumps([DEMO_MODEL_VERSION, MODEL_SHAPES[shape], mx.__version__, mlx_lm.__version__,
                          tokenizers.__version__], sort_keys=True, default=str)
    return f"{DEMO_MODEL_VERSION}-{shape}-{hashlib.sha256(made_by.encode()).hexdigest()[:12]}"


def make_model(dest, shape="demo", dtype="float32"):
    """Create a model folder at `dest` (atomically), unless it exists: a real
    llama-architecture model with seeded random weights and a byte-level BPE
    tokenizer trained offline. Loads with mlx_lm.load like any model; its
    output is not meaningful text."""
    marker = os.path.join(dest, ".complete")
    if os.path.exists(marker):
        return dest
    import importlib

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = dict(MODEL_SHAPES[shape])
    think = spec.pop("think", False)
    calls = spec.pop("calls", "json_tools")
    arch = spec.pop("arch", "llama")
    corpus = _demo_corpus() if spec.pop("corpus") == "demo" else _bench_corpus()
    import uuid

    tmp = f"{dest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<think>", "</think>"] if think else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.pop("vocab"),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    vocab = tok.get_vocab_size()
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "model_max_length": 32768,
                "clean_up_tokenization_spaces": False,
                "chat_template": _DEMO_TEMPLATE.replace(_JSON_CALL, _CALLS[calls])
                + (_THINK_SUFFIX if think else ""),
                "tool_parser_type": calls,
            },
            f,
            indent=1,
        )
    config = {
        "model_type": arch,
        "architectures": [{"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        **spec,
        "head_dim": spec["hidden_size"] // spec["num_attention_heads"],
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "pensieve_shape": shape,
        "pensieve_version": DEMO_MODEL_VERSION,
    }
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    mx.random.seed(0)
    family = importlib.import_module(f"mlx_lm.models.{arch}")
    model = family.Model(family.ModelArgs.from_dict(config))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(os.path.join(tmp, "model.safetensors"), weights)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write(DEMO_MODEL_VERSION)
    try:
        os.rename(tmp, dest)
    except OSError:
        # Another process made it first; theirs is as good as ours.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def qwen2_twin(src, dest):
    """A Qwen2-architecture copy of a llama-architecture model folder `src`
    (the trained demo): Qwen2's attention adds biases to q/k/v, here zero,
    so the twin computes what the original does, token for token. mlx-lm
    shards Qwen2 in pipeline mode as well as tensor mode, which llama lacks:
    the twin is how the demo's answers test pipeline sharding."""
    import shutil

    os.makedirs(dest, exist_ok=True)
    for f in os.listdir(src):
        if f.endswith(".json") and f != "config.json":
            shutil.copy(os.path.join(src, f), dest)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "llama":
        raise ValueError(f"{src} is a {config.get('model_type')!r} model, not llama")
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    weights = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            weights.update(mx.load(os.path.join(src, f)))
    for k in list(weights):
        if k.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            weights[k[: -len("weight")] + "bias"] = mx.zeros((weights[k].shape[0],), weights[k].dtype)
    mx.save_safetensors(os.path.join(dest, "model.safetensors"), weights)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return dest


def main(argv):
    """make-model SHAPE DEST [DTYPE] (python/make_model.py), or
    make-model qwen2-twin SRC DEST (see qwen2_twin)."""
    import sys

    if len(argv) == 3 and argv[0] == "qwen2-twin":
        print(qwen2_twin(argv[1], argv[2]))
    elif len(argv) >= 2:
        t0 = time.perf_counter()
        path = make_model(argv[1], argv[0], *(argv[2:3] or []))
        print(f"{path} ready in {time.perf_counter() - t0:.1f}s")
    else:
        sys.exit("usage: make_model.py {" + ",".join(MODEL_SHAPES) + "} DEST [float32|bfloat16|float16]")

"""Trains pensieve's built-in demo model: a tiny llama that answers in a toy
weather domain and calls a `get_weather(city)` tool in its chat template's
format (<tool_call>{json}</tool_call>, mlx-lm's json_tools parser), then uses
the tool's result in its next turn.

Reproducible: fixed seeds, synthetic conversations generated here, MLX only.

    .venv/bin/python python/train_demo.py models/pensieve-demo

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json
and TRAINING.md (with the time it took) into the output folder. The output is
committed to the repo, so no test trains at run time.
"""

import json
import os
import random
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

SEED = 7
CITIES = [
    "Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Oslo", "Lisbon", "Vienna", "Prague",
    "Dublin", "Athens", "Cairo", "Lima", "Quito", "Seoul", "Delhi", "Sydney", "Toronto", "Boston",
    "Chicago", "Denver", "Austin", "Miami", "Seattle", "Zurich", "Geneva", "Milan", "Munich", "Warsaw",
]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "stormy"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}
OTHER_TOOLS = [
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
]

# The chat template: ChatML with Hermes/Qwen-style tool calls.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "Tools:\n"
    "{%- for tool in tools %}"
    "<tool>{{ tool['function']['name'] }}: {{ tool['function']['description'] }} "
    "{{ (tool['function'].get('parameters') or {}).get('properties', {}) | tojson }}</tool>\n"
    "{%- endfor %}"
    "To call a function reply with <tool_call>{\"name\": name, \"arguments\": args}</tool_call>"
    "<|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "<|im_start|>tool\n{{ message['content'] }}<|im_end|>\n"
    "{%- elif message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{{ message['content'] or '' }}"
    "{%- for tc in message.get('tool_calls') or [] %}"
    "<tool_call>{\"name\": \"{{ tc['function']['name'] }}\", \"arguments\": {{ tc['function']['arguments'] | tojson }}}</tool_call>"
    "{%- endfor %}"
    "<|im_end|>\n"
    "{%- else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GREETINGS = ["hello", "hi", "hey", "hello there", "hi there", "good morning", "hey there"]
GREETING_REPLIES = [
    "Hello! I can tell you the weather in any city.",
    "Hi! Ask me about the weather in a city.",
]
ASK_FORMS = [
    "What is the weather in {c}?", "what's the weather in {c}?", "How is the weather in {c}?",
    "Weather in {c}?", "Is it raining in {c}?", "Tell me the weather in {c}.", "how is it in {c} today?",
    "What's it like outside in {c}?",
]
SYSTEMS = [None, "You are a helpful assistant.", "You are a weather bot. Be brief.", "Answer briefly."]


def call_msg(city):
    return {"role": "assistant", "content": "",
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": city}}}]}


def conversations(rng, n):
    """Synthetic conversations; each is (messages, tools, index of the first
    assistant message to learn from)."""
    out = []
    for _ in range(n):
        system = rng.choice(SYSTEMS)
        msgs = [{"role": "system", "content": system}] if system else []
        kind = rng.random()
        city = rng.choice(CITIES)
        cond, temp = rng.choice(CONDITIONS), rng.randint(-10, 35)
        tools = [WEATHER_TOOL] + (rng.sample(OTHER_TOOLS, 1) if rng.random() < 0.3 else [])
        rng.shuffle(tools)
        if kind < 0.08:
            msgs += [{"role": "user", "content": rng.choice(GREETINGS)},
                     {"role": "assistant", "content": rng.choice(GREETING_REPLIES)}]
            tools = tools if rng.random() < 0.5 else None
        elif kind < 0.14:
            # No tool offered: the model says it cannot look it up.
            msgs += [{"role": "user", "content": rng.choice(ASK_FORMS).format(c=city)},
                     {"role": "assistant", "content": f"I cannot check the weather in {city} without a weather tool."}]
            tools = None
        elif kind < 0.55:
            # Tool offered: call it.
            msgs += [{"role": "user", "content": rng.choice(ASK_FORMS).format(c=city)}, call_msg(city)]
        else:
            # The call happened; use the result.
            result = json.dumps({"city": city, "condition": cond, "temperature_c": temp})
            msgs += [{"role": "user", "content": rng.choice(ASK_FORMS).format(c=city)}, call_msg(city),
                     {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": result},
                     {"role": "assistant", "content": f"It is {cond} in {city}, {temp} degrees Celsius."}]
        out.append((msgs, tools))
    return out


def render(template, msgs, tools, add_generation_prompt=False):
    return template.render(messages=msgs, tools=tools, add_generation_prompt=add_generation_prompt)


def build_tokenizer(texts, dest):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(os.path.join(dest, "tokenizer.json"))
    with open(os.path.join(dest, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
            "model_max_length": 32768, "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
            "tool_parser_type": "json_tools",
        }, f, indent=1)
    return tok


def main(dest, steps=2400, batch=16):
    t_start = time.time()
    rng = random.Random(SEED)
    mx.random.seed(SEED)
    os.makedirs(dest, exist_ok=True)
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    template = env.from_string(CHAT_TEMPLATE)
    convs = conversations(rng, 6000)
    texts = [render(template, m, t) for m, t in convs]
    # The tokenizer also learns general text (the random demo's corpus), so
    # that prompts outside the toy domain (Claude Code's 50 KB system prompt)
    # still take a reasonable number of tokens.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pensieve_shim.modelmaker import _bench_corpus

    tok = build_tokenizer(texts + _bench_corpus()[:20000], dest)

    # Tokens and a loss mask: learn only the assistant turns.
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    asst = tok.encode("assistant\n").ids
    examples = []
    for text in texts:
        ids = tok.encode(text).ids
        mask = [0] * len(ids)
        i = 0
        while i < len(ids):
            if ids[i] == im_start and ids[i + 1 : i + 1 + len(asst)] == asst:
                j = i + 1 + len(asst)
                while j < len(ids) and ids[j] != im_end:
                    mask[j] = 1
                    j += 1
                if j < len(ids):
                    mask[j] = 1  # learn to stop
                i = j
            i += 1
        examples.append((ids, mask))
    max_len = max(len(ids) for ids, _ in examples)

    from mlx_lm.models import llama

    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "rms_norm_eps": 1e-5, "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 32768,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
        "eos_token_id": im_end, "pensieve_demo": "trained-v1",
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))

    def batch_arrays(items):
        L = max(len(ids) for ids, _ in items)
        x = [ids + [0] * (L - len(ids)) for ids, _ in items]
        m = [mask + [0] * (L - len(mask)) for _, mask in items]
        return mx.array(x), mx.array(m, dtype=mx.float32)

    def loss_fn(model, x, m):
        logits = model(x[:, :-1])
        ce = nn.losses.cross_entropy(logits, x[:, 1:], reduction="none")
        w = m[:, 1:]
        return (ce * w).sum() / w.sum()

    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-4, 2e-3, 100), optim.cosine_decay(2e-3, steps - 100, 1e-4)], [100])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step_fn = nn.value_and_grad(model, loss_fn)
    # Batches of similar length (less padding); batch order shuffled per epoch.
    by_len = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    batches = [by_len[i:i + batch] for i in range(0, len(by_len) - batch + 1, batch)]
    log = []
    t_train = time.time()
    for step in range(steps):
        if step % len(batches) == 0:
            rng.shuffle(batches)
        items = [examples[i] for i in batches[step % len(batches)]]
        x, m = batch_arrays(items)
        loss, grads = step_fn(model, x, m)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if step % 50 == 0 or step == steps - 1:
            log.append((step, loss.item()))
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t_train:.0f}s", flush=True)
    train_s = time.time() - t_train

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(os.path.join(dest, "model.safetensors"), weights)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(dest, "TRAINING.md"), "w") as f:
        f.write(
            "# pensieve demo model\n\n"
            f"Made by `python/train_demo.py` (seed {SEED}): a llama with {n_params / 1e6:.2f}M parameters "
            f"(hidden 128, 4 layers, vocab {tok.get_vocab_size()}), trained on 6000 synthetic weather "
            f"conversations (max {max_len} tokens), {steps} steps of batch {batch}, AdamW (100 warm-up steps to 2e-3, "
            "cosine decay to 1e-4), loss on assistant turns only.\n\n"
            f"Training took {train_s:.0f} s ({time.time() - t_start:.0f} s in all) on a 2-core x86_64 CPU "
            "(MLX CPU backend).\n\nLoss by step:\n\n"
            + "".join(f"- {s}: {l:.4f}\n" for s, l in log)
        )
    print(f"saved to {dest}: {n_params / 1e6:.2f}M params, trained in {train_s:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/pensieve-demo",
         steps=int(os.environ.get("DEMO_STEPS", "2400")))

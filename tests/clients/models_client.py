"""Several models in one server, through the official anthropic and openai
SDKs: both SDKs list every model with its state; each model answers under
its own name (loaded on first use) in both dialects, and the answer echoes
the name sent; an alias routes a client name (Claude Code's background tier)
to its model; names that look like paths or hub ids get the default model.

Usage: models_client.py PYTHON_DIR BASE_URL DEFAULT_ID OTHER_ID [OTHER_ID...]
"""
import sys

import anthropic
import httpx
import openai

from checks import check, done

base, default, others = sys.argv[2], sys.argv[3], sys.argv[4:]
names = [default] + others
a = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
o = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


def states():
    return {m["id"]: m for m in httpx.get(base + "/health").json()["models"]}


# Both SDKs list every model; only the default is loaded at start.
listed_a = [m.id for m in a.models.list().data]
listed_o = [m.id for m in o.models.list().data]
check("anthropic lists every model", all(n in listed_a for n in names), listed_a)
check("openai lists every model", all(n in listed_o for n in names), listed_o)
check("the default is listed first", listed_a[0] == default and listed_o[0] == default, listed_a)
raw = {m["id"]: m for m in httpx.get(base + "/v1/models").json()["data"]}
check("the default is loaded, with its context", raw[default]["state"] == "loaded" and raw[default]["context_length"] > 0,
      raw[default])
for n in others:
    check(f"{n} waits unloaded", raw[n]["state"] == "unloaded" and raw[n]["memory_bytes"] == 0, raw[n])

# Each model answers under its name in both dialects (the first request
# loads it); the response echoes the name sent.
for n in names:
    m = a.messages.create(model=n, max_tokens=4, messages=[{"role": "user", "content": "hello"}],
                          extra_body={"temperature": 0})
    check(f"anthropic: {n} answers", m.model == n and m.usage.output_tokens > 0, m)
    c = o.chat.completions.create(model=n, max_tokens=4, temperature=0, messages=[{"role": "user", "content": "hello"}])
    check(f"openai: {n} answers", c.model == n and c.usage.completion_tokens > 0, c)
    s = states()[n]
    check(f"{n} is loaded now, with memory and context", s["state"] == "loaded" and s["memory_bytes"] > 0
          and s["context_length"] > 0 and s["weights_bytes"] > 0, s)
    # Streamed too.
    with a.messages.stream(model=n, max_tokens=4, messages=[{"role": "user", "content": "hi"}]) as st:
        final = st.get_final_message()
    check(f"anthropic stream: {n}", final.model == n and final.usage.output_tokens > 0, final)
    chunks = list(o.chat.completions.create(model=n, max_tokens=4, stream=True, messages=[{"role": "user", "content": "hi"}]))
    check(f"openai stream: {n}", chunks and all(ch.model == n for ch in chunks), chunks[:2])

# Each model counts with its own tokenizer; the alias counts as its target.
prompt = [{"role": "user", "content": "Count these tokens, please: the quick brown fox jumps over the lazy dog."}]
counts = {n: a.messages.count_tokens(model=n, messages=prompt).input_tokens for n in names}
check("the models' tokenizers differ", len(set(counts.values())) > 1, counts)
haiku = a.messages.count_tokens(model="claude-haiku-4-5-20251001", messages=prompt).input_tokens
check("claude-haiku-* counts as the aliased model", haiku == counts[others[-1]], (haiku, counts))
m = a.messages.create(model="claude-haiku-4-5-20251001", max_tokens=3, messages=prompt)
check("the alias answers under the client's name", m.model == "claude-haiku-4-5-20251001", m)

# Names that look like paths or hub ids select nothing: the default serves
# them, and no model is loaded for them.
before = {k: v["loads"] for k, v in states().items()}
for name in ["../../etc/passwd", "/tmp/x", "org/model", "ollama:qwen3"]:
    n = a.messages.count_tokens(model=name, messages=prompt).input_tokens
    check(f"{name!r} is counted by the default", n == counts[default], (name, n))
    c = o.chat.completions.create(model=name, max_tokens=2, messages=prompt)
    check(f"{name!r} is answered by the default under its name", c.model == name, c)
after = states()
check("no model was loaded for them", {k: v["loads"] for k, v in after.items()} == before, (before, after))
check("the catalog did not grow", set(after) == set(before), after.keys())

done()

"""A server through the official anthropic and openai SDKs: streamed and
whole answers agree, the prefix cache serves a repeated conversation, and a
batch of streams that join and leave each get their own answer. Run against
the unsharded and the sharded server; the last line (RESULT {...}) holds the
answers, which must be the same for both.

Usage: shard_client.py PYTHON_DIR BASE_URL
"""
import json
import sys
import threading

import anthropic
import openai

from checks import check, done

base = sys.argv[2]
a = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
o = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
greedy = {"temperature": 0}
result = {}

questions = ["What is the weather in Paris?", "Hello there", "Tell me about Madrid weather please"]

# Whole and streamed, in both dialects: the same tokens.
for i, q in enumerate(questions):
    msgs = [{"role": "user", "content": q}]
    whole = a.messages.create(model="m", max_tokens=40, messages=msgs, extra_body=greedy)
    with a.messages.stream(model="m", max_tokens=40, messages=msgs, extra_body=greedy) as st:
        streamed = st.get_final_message()
    text = "".join(b.text for b in whole.content if b.type == "text")
    check(f"anthropic {i}: streamed = whole", "".join(b.text for b in streamed.content if b.type == "text") == text
          and streamed.usage.output_tokens == whole.usage.output_tokens, (whole, streamed))
    c = o.chat.completions.create(model="m", max_tokens=40, temperature=0, messages=msgs)
    chunks = list(o.chat.completions.create(model="m", max_tokens=40, temperature=0, messages=msgs, stream=True))
    otext = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check(f"openai {i}: streamed = whole", otext == c.choices[0].message.content, (otext, c))
    check(f"{i}: both dialects answer alike", otext == text, (otext, text))
    result[f"q{i}"] = [text, whole.usage.output_tokens]

# The prefix cache: a conversation sent again is read from it.
convo = [{"role": "user", "content": "What is the weather in Paris? " * 8},
         {"role": "assistant", "content": "I cannot check the weather without a tool."},
         {"role": "user", "content": "Then tell me about Madrid."}]
first = a.messages.create(model="m", max_tokens=24, messages=convo, extra_body=greedy)
again = a.messages.create(model="m", max_tokens=24, messages=convo, extra_body=greedy)
check("the repeat is served from the prefix cache",
      again.usage.cache_read_input_tokens >= first.usage.input_tokens + first.usage.cache_read_input_tokens - 2,
      (first.usage, again.usage))
check("the cached answer is the same", [b.text for b in again.content] == [b.text for b in first.content], (first, again))
result["convo"] = [b.text for b in first.content]

# Streams that join and leave a running batch (staggered starts, different
# lengths): each answer is the one it gets alone.
alone = {}
for n, q in zip((8, 30, 16, 24), questions + ["Hi"]):
    m = a.messages.create(model="m", max_tokens=n, messages=[{"role": "user", "content": q}], extra_body=greedy)
    alone[(n, q)] = "".join(b.text for b in m.content)
together = {}


def run(n, q):
    with a.messages.stream(model="m", max_tokens=n, messages=[{"role": "user", "content": q}], extra_body=greedy) as st:
        together[(n, q)] = "".join(b.text for b in st.get_final_message().content if b.type == "text")


threads = []
for n, q in zip((8, 30, 16, 24), questions + ["Hi"]):
    t = threading.Thread(target=run, args=(n, q))
    t.start()
    threads.append(t)
    threading.Event().wait(0.05)
for t in threads:
    t.join()
check("batched streams answer as they do alone", together == alone, (together, alone))
result["batch"] = [alone[k] for k in sorted(alone)]

print("RESULT " + json.dumps(result, sort_keys=True))
done()

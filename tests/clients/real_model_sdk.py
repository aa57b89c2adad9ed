"""Asks the real SmolLM2-135M-Instruct factual questions through both official
SDKs (greedy), and checks streaming gives exactly the non-streamed text.
Prints JSON results.

Usage: real_model_sdk.py BASE_URL
"""
import json
import sys

import anthropic
import openai

base = sys.argv[1]
a = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=120)
o = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
GREEDY = {"temperature": 0}
QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "What is 2 + 2?",
             "How many days are in a week?"]
out = {"anthropic": [], "openai": []}
for q in QUESTIONS:
    msgs = [{"role": "user", "content": q}]
    m = a.messages.create(model="claude-sonnet-4-5", max_tokens=40, messages=msgs, extra_body=GREEDY)
    text = "".join(b.text for b in m.content if b.type == "text")
    with a.messages.stream(model="claude-sonnet-4-5", max_tokens=40, messages=msgs, extra_body=GREEDY) as s:
        streamed = "".join(s.text_stream)
    out["anthropic"].append({"q": q, "text": text, "streamed": streamed, "stop_reason": m.stop_reason})
    c = o.chat.completions.create(model="gpt-4o", max_tokens=40, temperature=0, messages=msgs)
    chunks = o.chat.completions.create(model="gpt-4o", max_tokens=40, temperature=0, messages=msgs, stream=True)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    out["openai"].append({"q": q, "text": c.choices[0].message.content, "streamed": streamed,
                          "finish_reason": c.choices[0].finish_reason})
print(json.dumps(out))

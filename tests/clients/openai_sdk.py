"""Drives a pensieve server with the official openai SDK; prints JSON results.

Usage: openai_sdk.py BASE_URL API_KEY
"""
import json
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
msgs = [{"role": "user", "content": "hello there, what is the weather in Paris?"}]
out = {}

r = client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=12, temperature=0, seed=7)
out["create"] = {
    "id": r.id,
    "model": r.model,
    "text": r.choices[0].message.content,
    "finish_reason": r.choices[0].finish_reason,
    "prompt_tokens": r.usage.prompt_tokens,
    "completion_tokens": r.usage.completion_tokens,
}

pieces, finish, usage = [], None, None
stream = client.chat.completions.create(
    model="gpt-4o", messages=msgs, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage.completion_tokens
    for ch in chunk.choices:
        if ch.delta.content:
            pieces.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
out["stream"] = {"pieces": len(pieces), "text": "".join(pieces), "finish_reason": finish, "completion_tokens": usage}

c = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon a time", max_tokens=5, temperature=0)
out["completion"] = {"text": c.choices[0].text, "finish_reason": c.choices[0].finish_reason, "tokens": c.usage.completion_tokens}

out["models"] = [m.id for m in client.models.list()]

try:
    client.chat.completions.create(model="x", messages=msgs, n=2)
    out["bad_request"] = None
except openai.BadRequestError as e:
    out["bad_request"] = {"status": e.status_code, "message": e.message}

print(json.dumps(out))

"""Drives a pensieve server with the official anthropic SDK; prints JSON results.

Usage: anthropic_sdk.py BASE_URL API_KEY
"""
import json
import sys

import anthropic

base, key = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=60)
# This SDK has no temperature parameter: send it as an extra body field.
GREEDY = {"temperature": 0}
msgs = [{"role": "user", "content": "hello there, what is the weather in Paris?"}]
out = {}

m = client.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=msgs, extra_body=GREEDY)
out["create"] = {
    "id": m.id,
    "model": m.model,
    "text": "".join(b.text for b in m.content if b.type == "text"),
    "stop_reason": m.stop_reason,
    "input_tokens": m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0),
    "output_tokens": m.usage.output_tokens,
}

with client.messages.stream(model="claude-sonnet-4-5", max_tokens=16, messages=msgs, extra_body=GREEDY) as s:
    pieces = list(s.text_stream)
    final = s.get_final_message()
out["stream"] = {
    "pieces": len(pieces),
    "text": "".join(pieces),
    "final_text": "".join(b.text for b in final.content if b.type == "text"),
    "stop_reason": final.stop_reason,
    "output_tokens": final.usage.output_tokens,
}

text = out["create"]["text"]
stop = text[len(text) // 2 : len(text) // 2 + 3]
m = client.messages.create(
    model="claude-sonnet-4-5", max_tokens=16, messages=msgs, extra_body=GREEDY, stop_sequences=[stop]
)
out["stop"] = {"stop": stop, "stop_reason": m.stop_reason, "stop_sequence": m.stop_sequence, "text": m.content[0].text}

out["count"] = client.messages.count_tokens(model="claude-sonnet-4-5", messages=msgs).input_tokens
out["models"] = [x.id for x in client.models.list()]

try:
    client.messages.create(model="x", max_tokens=5, messages=[])
    out["bad_request"] = None
except anthropic.BadRequestError as e:
    out["bad_request"] = {"status": e.status_code, "type": e.body["error"]["type"]}

print(json.dumps(out))

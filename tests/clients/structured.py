"""Structured outputs through the official SDKs, every answer checked by a
real JSON-schema validator (jsonschema): response formats in both dialects,
streamed and not, chat and completions; forced and strict tool calls; a
schema the engine cannot enforce; log-probabilities; and constrained
requests mixed in one batch with unconstrained ones, whose tokens must stay
those they get alone.

Usage: structured.py PYTHON_DIR BASE_URL   (against builtin:random, whose
unconstrained output is noise: only the grammar makes it parse)
"""
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor

import anthropic
import jsonschema
import openai

from checks import check, done

base = sys.argv[2]
oa = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
an = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=120)
MSG = [{"role": "user", "content": "describe the weather in Paris as JSON"}]

# Bounded schemas (every string, number and array has limits) so that even
# noise finishes well inside max_tokens; each covers one feature.
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "today": {
                "type": "object",
                "properties": {
                    "temp": {"type": "integer", "minimum": -30, "maximum": 45},
                    "sunny": {"type": "boolean"},
                },
                "required": ["temp", "sunny"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "today"],
        "additionalProperties": False,
    },
    "bounded_array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"sky": {"enum": ["clear", "cloudy", "rain"]}, "level": {"enum": [1, 2, 3]}},
        "required": ["sky", "level"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                           {"type": "string", "maxLength": 4}, {"type": "null"}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                       "note": {"type": "string", "maxLength": 6},
                       "ok": {"type": "boolean"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]$"}},
        "required": ["code", "date"],
        "additionalProperties": False,
    },
}


def valid(name, text, schema):
    try:
        doc = json.loads(text)
        jsonschema.validate(doc, schema)
        check(name, True)
        return doc
    except (ValueError, jsonschema.ValidationError) as e:
        check(name, False, f"{text!r}: {e}")
        return None


def sampling(i):
    """Greedy, then seeded draws at temperature 1 (different outputs)."""
    return {"temperature": 0} if i == 0 else {"temperature": 1.0, "seed": 100 + i}


def oa_chat(schema, stream, i):
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    s = sampling(i)
    if not stream:
        r = oa.chat.completions.create(model="m", messages=MSG, max_tokens=300, response_format=rf, **s)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in oa.chat.completions.create(model="m", messages=MSG, max_tokens=300, response_format=rf, stream=True, **s):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish


def oa_completion(schema, stream, i):
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    s = sampling(i)
    kw = dict(model="m", prompt="weather report:", max_tokens=300, extra_body={"response_format": rf}, **s)
    if not stream:
        r = oa.completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in oa.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            text += ch.text or ""
            finish = ch.finish_reason or finish
    return text, finish


def an_messages(schema, stream, i):
    s = sampling(i)
    extra = {"output_config": {"format": {"type": "json_schema", "schema": schema}}, **s}
    if not stream:
        r = an.messages.create(model="m", max_tokens=300, messages=MSG, extra_body=extra)
        return "".join(b.text for b in r.content if b.type == "text"), r.stop_reason
    with an.messages.stream(model="m", max_tokens=300, messages=MSG, extra_body=extra) as st:
        text = "".join(st.text_stream)
        return text, st.get_final_message().stop_reason


# 1. Response formats: every schema, both dialects, streamed and not, greedy
#    and sampled.
for name, schema in SCHEMAS.items():
    for api, call, ok_finish in (("openai-chat", oa_chat, "stop"), ("openai-completions", oa_completion, "stop"),
                                 ("anthropic", an_messages, "end_turn")):
        for stream in (False, True):
            for i in range(3):
                text, finish = call(schema, stream, i)
                tag = f"{api} {name} stream={stream} draw={i}"
                check(f"{tag} finished", finish == ok_finish, f"{finish}: {text!r}")
                valid(f"{tag} valid", text, schema)

# json_object: any object (noise may run long: then the output is a prefix
# and the finish says length, as with the hosted APIs).
for i in range(3):
    r = oa.chat.completions.create(model="m", messages=MSG, max_tokens=400, response_format={"type": "json_object"},
                                   **sampling(i))
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    if finish == "stop":
        doc = valid(f"json_object draw={i}", text, {"type": "object"})
    else:
        check(f"json_object draw={i} cut at max_tokens", finish == "length" and text.startswith("{"), f"{finish}: {text!r}")

# max_tokens inside the object: a prefix, finish length / max_tokens.
r = oa.chat.completions.create(model="m", messages=MSG, max_tokens=3, temperature=0,
                               response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS["nested"]}})
check("max_tokens mid-object is length", r.choices[0].finish_reason == "length", r.choices[0].finish_reason)
check("max_tokens mid-object is a prefix", r.choices[0].message.content.startswith("{"), r.choices[0].message.content)
m = an.messages.create(model="m", max_tokens=3, messages=MSG,
                       extra_body={"temperature": 0, "output_config": {"format": {"type": "json_schema", "schema": SCHEMAS["nested"]}}})
check("anthropic max_tokens mid-object", m.stop_reason == "max_tokens", m.stop_reason)

# 2. Forced tool calls always yield a valid call, both dialects; strict tools.
TOOLS = [
    {"name": "get_weather", "description": "weather for a city",
     "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                       "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                      "required": ["city", "days"], "additionalProperties": False}},
    {"name": "set_alarm", "description": "an alarm",
     "input_schema": {"type": "object", "properties": {"time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                                                       "label": {"type": "string", "maxLength": 6}},
                      "required": ["time"], "additionalProperties": False}},
]
SCHEMA_OF = {t["name"]: t["input_schema"] for t in TOOLS}
OA_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                              "parameters": t["input_schema"]}} for t in TOOLS]

for i in range(4):
    for choice in ({"type": "any"}, {"type": "tool", "name": "set_alarm"}):
        m = an.messages.create(model="m", max_tokens=300, messages=MSG, tools=TOOLS, tool_choice=choice,
                               extra_body=sampling(i))
        uses = [b for b in m.content if b.type == "tool_use"]
        tag = f"anthropic forced {choice['type']} draw={i}"
        check(f"{tag} calls", m.stop_reason == "tool_use" and len(uses) == 1, f"{m.stop_reason} {m.content}")
        for u in uses:
            if choice["type"] == "tool":
                check(f"{tag} named", u.name == "set_alarm", u.name)
            valid(f"{tag} input valid", json.dumps(u.input), SCHEMA_OF.get(u.name, {"not": {}}))
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = oa.chat.completions.create(model="m", messages=MSG, max_tokens=300, tools=OA_TOOLS, tool_choice=choice,
                                       **sampling(i))
        calls = r.choices[0].message.tool_calls or []
        tag = f"openai forced {choice if isinstance(choice, str) else 'named'} draw={i}"
        check(f"{tag} calls", r.choices[0].finish_reason == "tool_calls" and len(calls) == 1,
              f"{r.choices[0].finish_reason} {r.choices[0].message}")
        for c in calls:
            valid(f"{tag} arguments valid", c.function.arguments, SCHEMA_OF.get(c.function.name, {"not": {}}))

# Streamed forced calls, both dialects.
with an.messages.stream(model="m", max_tokens=300, messages=MSG, tools=TOOLS, tool_choice={"type": "any"},
                        extra_body={"temperature": 1.0}) as st:
    final = st.get_final_message()
uses = [b for b in final.content if b.type == "tool_use"]
check("anthropic streamed forced call", final.stop_reason == "tool_use" and len(uses) == 1, final.content)
for u in uses:
    valid("anthropic streamed forced input valid", json.dumps(u.input), SCHEMA_OF[u.name])
args, name = "", None
for chunk in oa.chat.completions.create(model="m", messages=MSG, max_tokens=300, tools=OA_TOOLS, tool_choice="required",
                                        stream=True, temperature=1.0):
    for ch in chunk.choices:
        for tc in ch.delta.tool_calls or []:
            name = tc.function.name or name
            args += tc.function.arguments or ""
check("openai streamed forced call named", name in SCHEMA_OF, name)
if name in SCHEMA_OF:
    valid("openai streamed forced arguments valid", args, SCHEMA_OF[name])

# Strict tools: whatever the model writes, a call it makes follows the schema.
strict = [dict(t, strict=True) for t in TOOLS]
made = 0
for i in range(6):
    m = an.messages.create(model="m", max_tokens=120, messages=MSG, tools=strict, extra_body=sampling(i))
    for u in (b for b in m.content if b.type == "tool_use"):
        made += 1
        valid(f"strict tool call draw={i} valid", json.dumps(u.input), SCHEMA_OF[u.name])
print(f"strict tools: {made} calls made in 6 answers")

# 3. A schema the engine cannot enforce: a 400 in each dialect's shape, naming it.
for bad, needle in (({"type": "strin"}, "strin"),
                    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
                    ({"type": "string", "format": "no-such-format"}, "no-such-format")):
    try:
        oa.chat.completions.create(model="m", messages=MSG, max_tokens=5,
                                   response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
        check(f"openai 400 for {bad}", False, "accepted")
    except openai.BadRequestError as e:
        check(f"openai 400 for {bad}", e.status_code == 400 and needle in e.message, e.message)
    try:
        an.messages.create(model="m", max_tokens=5, messages=MSG,
                           extra_body={"output_config": {"format": {"type": "json_schema", "schema": bad}}})
        check(f"anthropic 400 for {bad}", False, "accepted")
    except anthropic.BadRequestError as e:
        check(f"anthropic 400 for {bad}", e.status_code == 400 and e.body["error"]["type"] == "invalid_request_error"
              and needle in e.body["error"]["message"], e.body)
try:
    an.messages.create(model="m", max_tokens=5, messages=MSG, tools=[dict(TOOLS[0], strict=True,
                       input_schema={"type": "object", "properties": {"a": {"type": "nope"}}})])
    check("anthropic 400 for a strict tool's schema", False, "accepted")
except anthropic.BadRequestError as e:
    check("anthropic 400 for a strict tool's schema names the tool", "get_weather" in e.body["error"]["message"], e.body)

# 4. Log-probabilities: of the masked distribution, chat and completions,
#    streamed and not.
yes_no = {"type": "json_schema", "json_schema": {"name": "yn", "schema": {"enum": ["yes", "no"]}}}
r = oa.chat.completions.create(model="m", messages=MSG, max_tokens=20, temperature=0, logprobs=True, top_logprobs=20,
                               response_format=yes_no)
content = r.choices[0].logprobs.content
check("logprobs one entry per token", len(content) == r.usage.completion_tokens - 1 or len(content) == r.usage.completion_tokens,
      f"{len(content)} vs {r.usage.completion_tokens}")
check("logprobs spell the text", "".join(c.token for c in content) == r.choices[0].message.content,
      f"{[c.token for c in content]} vs {r.choices[0].message.content!r}")
for j, c in enumerate(content):
    total = sum(math.exp(a.logprob) for a in c.top_logprobs)
    # Only a handful of tokens can continue "yes" or "no": the top 20 hold
    # all the mass of the masked distribution.
    check(f"masked distribution sums to 1 at token {j}", abs(total - 1.0) < 1e-3, total)
    check(f"chosen is the most likely (greedy) at {j}", abs(c.logprob - c.top_logprobs[0].logprob) < 1e-6, c)
    check(f"alternatives sorted at {j}", all(a.logprob >= b.logprob for a, b in zip(c.top_logprobs, c.top_logprobs[1:])), c)
    check(f"bytes spell the token at {j}", bytes(c.bytes).decode("utf-8", "replace") == c.token, c)

plain = oa.chat.completions.create(model="m", messages=MSG, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
pc = plain.choices[0].logprobs.content
check("unconstrained logprobs: 3 alternatives each", all(len(c.top_logprobs) == 3 for c in pc) and len(pc) == 8, pc)
check("unconstrained logprobs are not all certain", any(c.logprob < -1e-3 for c in pc), pc)

streamed = []
text = ""
for chunk in oa.chat.completions.create(model="m", messages=MSG, max_tokens=8, temperature=0, logprobs=True,
                                        top_logprobs=3, stream=True):
    for ch in chunk.choices:
        text += ch.delta.content or ""
        if ch.logprobs and ch.logprobs.content:
            streamed.extend(ch.logprobs.content)
check("streamed logprobs equal the non-streamed ones",
      [(c.token, round(c.logprob, 5)) for c in streamed] == [(c.token, round(c.logprob, 5)) for c in pc],
      f"{streamed} vs {pc}")

c = oa.completions.create(model="m", prompt="weather report:", max_tokens=6, temperature=0, logprobs=5)
lp = c.choices[0].logprobs
check("completions logprobs", len(lp.tokens) == 6 and len(lp.token_logprobs) == 6 and all(len(t) <= 5 for t in lp.top_logprobs)
      and "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0, lp)
toks = []
for chunk in oa.completions.create(model="m", prompt="weather report:", max_tokens=6, temperature=0, logprobs=5, stream=True):
    for ch in chunk.choices:
        if ch.logprobs:
            toks.extend(ch.logprobs.tokens)
check("streamed completions logprobs", toks == lp.tokens, f"{toks} vs {lp.tokens}")
for bad in (21, -1):
    try:
        oa.chat.completions.create(model="m", messages=MSG, max_tokens=2, logprobs=True, top_logprobs=bad)
        check(f"top_logprobs {bad} refused", False, "accepted")
    except openai.BadRequestError as e:
        check(f"top_logprobs {bad} refused", e.status_code == 400, e.message)

# 5. Mixed in one batch: unconstrained greedy requests keep their tokens.
def plain_answer(prompt):
    r = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], max_tokens=60,
                                   temperature=0, logprobs=True)
    return [t.token for t in r.choices[0].logprobs.content]


prompts = ["hello there", "what is a tool call", "the weather in Rome today"]
alone = [plain_answer(p) for p in prompts]
with ThreadPoolExecutor(8) as pool:
    constrained = [pool.submit(oa_chat, SCHEMAS[n], n == "enum", 1 + k) for k, n in enumerate(SCHEMAS)]
    forced = [pool.submit(lambda: an.messages.create(model="m", max_tokens=300, messages=MSG, tools=TOOLS,
                                                     tool_choice={"type": "any"}, extra_body={"temperature": 1.0}))]
    together = [pool.submit(plain_answer, p) for p in prompts]
    for k, (n, f) in enumerate(zip(SCHEMAS, constrained)):
        text, finish = f.result()
        valid(f"batched constrained {n}", text, SCHEMAS[n])
    m = forced[0].result()
    for u in (b for b in m.content if b.type == "tool_use"):
        valid("batched forced call", json.dumps(u.input), SCHEMA_OF[u.name])
    for p, a, t in zip(prompts, alone, together):
        check(f"unconstrained {p!r} token-identical next to constrained ones", t.result() == a, f"{t.result()} vs {a}")

done()

"""A full tool round trip through the official SDKs against the trained demo
model: tool_use -> tool_result -> final answer (anthropic, create and
stream), and tool_calls -> tool message -> answer (openai). Prints JSON.

Usage: tool_roundtrip.py BASE_URL
"""
import json
import sys

import anthropic
import openai

base = sys.argv[1]
out = {}
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Get the current weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                            "required": ["city"]}}
RESULT = json.dumps({"city": "Paris", "condition": "sunny", "temperature_c": 21})
question = [{"role": "user", "content": "What is the weather in Paris?"}]

a = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=120)
m1 = a.messages.create(model="demo", max_tokens=64, tools=[WEATHER], messages=question, extra_body=GREEDY)
calls = [b for b in m1.content if b.type == "tool_use"]
out["anthropic_call"] = {"stop_reason": m1.stop_reason,
                         "calls": [{"id": c.id, "name": c.name, "input": c.input} for c in calls],
                         "text": "".join(b.text for b in m1.content if b.type == "text")}

with a.messages.stream(model="demo", max_tokens=64, tools=[WEATHER], messages=question, extra_body=GREEDY) as s:
    events = [e.type for e in s]
    final = s.get_final_message()
out["anthropic_stream"] = {"stop_reason": final.stop_reason,
                           "inputs": [b.input for b in final.content if b.type == "tool_use"],
                           "names": [b.name for b in final.content if b.type == "tool_use"],
                           "saw_input_json": "input_json" in events}

if calls:
    follow = question + [
        {"role": "assistant", "content": m1.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": RESULT}]},
    ]
    m2 = a.messages.create(model="demo", max_tokens=64, tools=[WEATHER], messages=follow, extra_body=GREEDY)
    out["anthropic_answer"] = {"stop_reason": m2.stop_reason,
                               "text": "".join(b.text for b in m2.content if b.type == "text")}

o = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
otools = [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                            "parameters": WEATHER["input_schema"]}}]
r1 = o.chat.completions.create(model="demo", messages=question, tools=otools, temperature=0, max_tokens=64)
msg = r1.choices[0].message
out["openai_call"] = {"finish_reason": r1.choices[0].finish_reason,
                      "calls": [{"id": c.id, "name": c.function.name, "arguments": json.loads(c.function.arguments)}
                                for c in (msg.tool_calls or [])]}
stream = o.chat.completions.create(model="demo", messages=question, tools=otools, temperature=0, max_tokens=64,
                                   stream=True)
args, names, finish = {}, {}, None
for chunk in stream:
    for ch in chunk.choices:
        for tc in ch.delta.tool_calls or []:
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
            if tc.function.name:
                names[tc.index] = tc.function.name
        finish = ch.finish_reason or finish
out["openai_stream"] = {"finish_reason": finish, "names": list(names.values()),
                        "arguments": [json.loads(v) for v in args.values()]}
if msg.tool_calls:
    follow = question + [
        {"role": "assistant", "content": msg.content, "tool_calls": [tc.model_dump() for tc in msg.tool_calls]},
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": RESULT},
    ]
    r2 = o.chat.completions.create(model="demo", messages=follow, tools=otools, temperature=0, max_tokens=64)
    out["openai_answer"] = {"finish_reason": r2.choices[0].finish_reason, "text": r2.choices[0].message.content}

print(json.dumps(out))

"""The Responses API through the official openai SDK against the trained
demo model (which calls its weather tool): create streamed and not, the
event sequence, a function-tool round trip chained by previous_response_id
(served from the prefix cache), text.format json_schema, store / retrieve /
delete, and errors.

Usage: responses_client.py PYTHON_DIR BASE_URL
"""
import json
import sys

import openai

from checks import check, done

c = openai.OpenAI(base_url=sys.argv[2] + "/v1", api_key="x", max_retries=0, timeout=60)
G = dict(temperature=0, max_output_tokens=40)

r = c.responses.create(model="demo", input="hello", **G)
check("create", r.status == "completed" and r.output_text and r.object == "response" and r.id.startswith("resp_"), r)
check("usage", r.usage.input_tokens > 0 and r.usage.output_tokens > 0
      and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage)

events, text, final = [], "", None
for ev in c.responses.create(model="demo", input="hello", stream=True, **G):
    events.append(ev)
    if ev.type == "response.output_text.delta":
        text += ev.delta
    if ev.type == "response.completed":
        final = ev.response
types = [e.type for e in events]
check("event sequence", types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                                       "response.content_part.added"]
      and types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                         "response.completed"], types)
check("sequence numbers", [e.sequence_number for e in events] == list(range(len(events))), [e.sequence_number for e in events])
check("streamed text equals", text == r.output_text and final.output_text == text, (text, r.output_text))

with c.responses.stream(model="demo", input="hello", **G) as st:
    for _ in st:
        pass
    check("the SDK's stream helper", st.get_final_response().output_text == r.output_text, st.get_final_response())

instr = c.responses.create(model="demo", input="hello", instructions="You are terse.", **G)
check("instructions", instr.status == "completed" and instr.instructions == "You are terse.", instr)

# Max output tokens: incomplete.
short = c.responses.create(model="demo", input="hello", temperature=0, max_output_tokens=3)
check("incomplete at max_output_tokens", short.status == "incomplete"
      and short.incomplete_details.reason == "max_output_tokens" and short.usage.output_tokens == 3, short)

# A function-tool round trip, chained by previous_response_id.
tool = {"type": "function", "name": "get_weather", "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                       "required": ["city"]}}
r1 = c.responses.create(model="demo", input="What is the weather in Paris?", tools=[tool], temperature=0, max_output_tokens=64)
calls = [o for o in r1.output if o.type == "function_call"]
check("function call", len(calls) == 1 and calls[0].name == "get_weather"
      and json.loads(calls[0].arguments) == {"city": "Paris"} and calls[0].call_id, r1.output)
if calls:
    r2 = c.responses.create(model="demo", previous_response_id=r1.id, tools=[tool], temperature=0, max_output_tokens=64,
                            input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                    "output": json.dumps({"city": "Paris", "condition": "sunny", "temperature_c": 21})}])
    check("round trip answered", "sunny" in r2.output_text.lower() and r2.previous_response_id == r1.id, r2.output_text)
    check("the chain is served from the prefix cache",
          r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens, (r2.usage, r1.usage))
    # The same round trip with the whole conversation sent as items (no store).
    r3 = c.responses.create(model="demo", tools=[tool], temperature=0, max_output_tokens=64, store=False, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id,
         "output": json.dumps({"city": "Paris", "condition": "sunny", "temperature_c": 21})}])
    check("items round trip equals the chain", r3.output_text == r2.output_text, (r3.output_text, r2.output_text))
    try:
        c.responses.retrieve(r3.id)
        check("store false keeps nothing", False, "retrievable")
    except openai.NotFoundError:
        check("store false keeps nothing", True)

# Streamed function call events.
ev_types, args = [], ""
for ev in c.responses.create(model="demo", input="What is the weather in Paris?", tools=[tool], temperature=0,
                             max_output_tokens=64, stream=True):
    ev_types.append(ev.type)
    if ev.type == "response.function_call_arguments.delta":
        args += ev.delta
check("streamed call", "response.function_call_arguments.done" in ev_types and json.loads(args) == {"city": "Paris"}, ev_types)

# Forced and structured.
forced = c.responses.create(model="demo", input="Tell me about Rome.", tools=[tool], tool_choice="required", temperature=0,
                            max_output_tokens=64)
check("tool_choice required", [o.type for o in forced.output] == ["function_call"]
      and "city" in json.loads(forced.output[0].arguments), forced.output)
schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}
js = c.responses.create(model="demo", input="weather in Paris as JSON", temperature=0, max_output_tokens=60,
                        text={"format": {"type": "json_schema", "name": "w", "schema": schema, "strict": True}})
try:
    doc = json.loads(js.output_text)
    check("text.format json_schema", doc["city"] in ("Paris", "Rome") and isinstance(doc["sunny"], bool), doc)
except ValueError as e:
    check("text.format json_schema parses", False, f"{js.output_text!r}: {e}")

# Retrieve and delete.
got = c.responses.retrieve(r.id)
check("retrieve", got.id == r.id and got.output_text == r.output_text, got)
c.responses.delete(r.id)
try:
    c.responses.retrieve(r.id)
    check("deleted", False, "still there")
except openai.NotFoundError as e:
    check("deleted", e.status_code == 404, e)

# Errors in OpenAI's shape.
for name, kw, code in (
    ("built-in tool", dict(input="x", tools=[{"type": "web_search"}]), 400),
    ("unknown previous response", dict(input="x", previous_response_id="resp_nope"), 404),
    ("image input", dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]), 400),
    ("bad temperature", dict(input="x", temperature=5), 400),
):
    try:
        c.responses.create(model="demo", **kw)
        check(name, False, "accepted")
    except openai.APIStatusError as e:
        check(name, e.status_code == code and isinstance(e.body, dict) and e.body.get("message"), (e.status_code, e.body))

done()

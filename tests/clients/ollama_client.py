"""The Ollama API through the official ollama Python client, against the
trained demo model (which calls its weather tool): chat streamed and not,
generate, tools round trip, format (JSON schema), list, show, ps, version,
options, and errors in Ollama's shape.

Usage: ollama_client.py PYTHON_DIR BASE_URL
"""
import json
import sys

import httpx
import ollama

from checks import check, done

base = sys.argv[2]
c = ollama.Client(host=base)
Q = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "num_predict": 40}

# Chat, not streamed: Ollama's shape with measured timings.
r = c.chat(model="demo", messages=[{"role": "user", "content": "hello"}], options=GREEDY, stream=False)
check("chat answers", r.message.role == "assistant" and len(r.message.content) > 0, r)
check("chat done", r.done and r.done_reason in ("stop", "length"), r)
check("chat timings", r.total_duration > 0 and r.eval_count > 0 and r.prompt_eval_count > 0
      and r.eval_duration > 0 and r.prompt_eval_duration > 0 and r.total_duration >= r.eval_duration, r)

# Chat streamed (the API's default; this client asks for it): the pieces join to the non-streamed text.
pieces, last = [], None
for part in c.chat(model="demo", messages=[{"role": "user", "content": "hello"}], options=GREEDY, stream=True):
    pieces.append(part.message.content)
    last = part
check("stream pieces", len(pieces) > 2, pieces)
check("stream equals non-streamed", "".join(pieces) == r.message.content, f"{''.join(pieces)!r} vs {r.message.content!r}")
check("stream ends done with counts", last.done and last.eval_count == r.eval_count, last)

# Generate, both ways.
g = c.generate(model="demo", prompt="hello", options=GREEDY, stream=False)
check("generate", len(g.response) > 0 and g.done, g)
gs = "".join(p.response for p in c.generate(model="demo", prompt="hello", options=GREEDY, stream=True))
check("generate streamed equals", gs == g.response, f"{gs!r} vs {g.response!r}")
check("generate uses the chat template like chat", g.response == r.message.content, f"{g.response!r} vs {r.message.content!r}")

# Options: num_predict, stop, seed.
short = c.chat(model="demo", messages=Q, options={"temperature": 0, "num_predict": 3}, stream=False)
check("num_predict caps the output", short.eval_count == 3 and short.done_reason == "length", short)
s1 = c.chat(model="demo", messages=[{"role": "user", "content": "hello"}], options={"temperature": 1, "seed": 7, "num_predict": 12}, stream=False)
s2 = c.chat(model="demo", messages=[{"role": "user", "content": "hello"}], options={"temperature": 1, "seed": 7, "num_predict": 12}, stream=False)
check("seed repeats", s1.message.content == s2.message.content, (s1.message.content, s2.message.content))

# Tools: the demo model calls get_weather; the round trip answers with the result.
weather = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                          "required": ["city"]}}}
t = c.chat(model="demo", messages=Q, tools=[weather], options={"temperature": 0, "num_predict": 64}, stream=False)
calls = t.message.tool_calls or []
check("tool call", len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].function.arguments.get("city") == "Paris", t)
if calls:
    follow = Q + [t.message, {"role": "tool", "tool_name": "get_weather",
                              "content": json.dumps({"city": "Paris", "condition": "sunny", "temperature_c": 21})}]
    a = c.chat(model="demo", messages=follow, tools=[weather], options={"temperature": 0, "num_predict": 64}, stream=False)
    check("tool result answered", "sunny" in a.message.content.lower() and not a.message.tool_calls, a)
streamed_calls = [tc for part in c.chat(model="demo", messages=Q, tools=[weather], options={"temperature": 0, "num_predict": 64}, stream=True)
                  for tc in (part.message.tool_calls or []) if part]
check("streamed tool call", [x.function.name for x in streamed_calls] == ["get_weather"], streamed_calls)

# format: a JSON schema (constrained decoding) and "json".
schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "temp": {"type": "integer", "minimum": -20, "maximum": 45}},
          "required": ["city", "temp"], "additionalProperties": False}
f = c.chat(model="demo", messages=Q, format=schema, options={"temperature": 0, "num_predict": 60}, stream=False)
try:
    doc = json.loads(f.message.content)
    check("format schema", doc["city"] in ("Paris", "Rome") and -20 <= doc["temp"] <= 45 and set(doc) == {"city", "temp"}, doc)
except ValueError as e:
    check("format schema parses", False, f"{f.message.content!r}: {e}")
fj = c.generate(model="demo", prompt="weather as json", format="json", options={"temperature": 0, "num_predict": 80}, stream=False)
if fj.done_reason == "stop":
    check("format json", isinstance(json.loads(fj.response), dict), fj.response)
else:
    check("format json cut at num_predict is a prefix", fj.response.startswith("{"), fj.response)

# Models.
tags = c.list()
check("list: the served model first, then the built-ins", tags.models[0].model == "pensieve-demo"
      and {"SmolLM2-135M-Instruct"} <= {m.model for m in tags.models}, tags)
show = c.show("demo")
check("show", "completion" in (show.capabilities or []) and "tools" in (show.capabilities or []) and show.template, show)
ctx_keys = [k for k in (show.modelinfo or {}) if k.endswith(".context_length")]
check("show context length", ctx_keys and show.modelinfo[ctx_keys[0]] > 0, show.modelinfo)
ps = c.ps()
check("ps: the loaded models", [m.model for m in ps.models] == ["pensieve-demo"], ps)
v = httpx.get(base + "/api/version").json()
check("version", isinstance(v.get("version"), str), v)

# Errors in Ollama's shape.
def error_of(fn):
    try:
        fn()
        return None
    except ollama.ResponseError as e:
        return e
e = error_of(lambda: c.pull("llama3"))
check("pull says what to do", e is not None and e.status_code == 400 and "--model" in e.error, e)
e = error_of(lambda: c.delete("demo"))
check("delete refused", e is not None and e.status_code == 400, e)
e = error_of(lambda: c.chat(model="demo", messages=[{"role": "robot", "content": "x"}], stream=False))
check("bad role 400", e is not None and e.status_code == 400 and "role" in e.error, e)
e = error_of(lambda: c.chat(model="demo", messages=Q, options={"num_ctx": 8}, stream=False))
check("num_ctx caps the context", e is not None and e.status_code == 400 and "prompt is too long" in e.error, e)
raw = httpx.post(base + "/api/chat", content=b"{not json")
check("malformed body: 400 {error}", raw.status_code == 400 and isinstance(raw.json().get("error"), str), raw.text)
# Ollama's documented `curl -d` sends a form content-type: accepted from a
# non-browser client, refused from a browser (it sends an Origin).
body = json.dumps({"model": "demo", "prompt": "hi", "stream": False, "options": GREEDY}).encode()
form = {"content-type": "application/x-www-form-urlencoded"}
raw = httpx.post(base + "/api/generate", content=body, headers=form)
check("curl -d style body accepted", raw.status_code == 200 and raw.json()["done"], raw.text)
raw = httpx.post(base + "/api/generate", content=body, headers=dict(form, origin=base))
check("the same from a browser page refused", raw.status_code in (403, 415) and "error" in raw.json(), raw.text)
raw = httpx.get(base + "/api/nothing")
check("unknown path: 404 {error}", raw.status_code == 404 and isinstance(raw.json().get("error"), str), raw.text)
raw = httpx.get(base + "/api/chat")
check("wrong method: 405 {error}", raw.status_code == 405 and isinstance(raw.json().get("error"), str), raw.text)
nd = httpx.post(base + "/api/generate", json={"model": "demo", "prompt": "hi", "options": GREEDY})
lines = [json.loads(x) for x in nd.text.splitlines()]
check("streams NDJSON by default", nd.headers["content-type"] == "application/x-ndjson" and len(lines) > 2
      and lines[-1]["done"] and not any(x["done"] for x in lines[:-1]), nd.text[:300])

done()

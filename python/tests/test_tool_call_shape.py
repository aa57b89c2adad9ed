"""ChatTemplate.tool_call_shape: the text around a call's name and
arguments, read off the model's own template — one JSON object, or a list of
parameters (values JSON, strings raw where the template writes them raw). A
call spelled in that shape must parse back through the family's own parser
(what the Rust grammar relies on: src/constrain.rs)."""
import importlib
import json

import jinja2

from pensieve_shim import Splitter
from pensieve_shim.chat import ChatTemplate

_BASE = (
    "{% for m in messages %}{% if m.role == 'user' %}<|user|>{{ m.content }}<|end|>"
    "{% else %}<|assistant|>{{ m.content or '' }}{% for tc in m.tool_calls or [] %}CALL{% endfor %}<|end|>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# How each family's templates render one call (tc: the call).
CALLS = {
    # Qwen2.5 / Hermes
    "json_tools": '<tool_call>\n{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}\n</tool_call>',
    # Mistral (v11+ templates)
    "mistral": "[TOOL_CALLS]{{ tc.function.name }}[ARGS]{{ tc.function.arguments | tojson }}",
    # Qwen3-Coder: XML parameters (objects and arrays as JSON)
    "qwen3_coder": "<tool_call>\n<function={{ tc.function.name }}>\n{% for k, v in tc.function.arguments.items() %}"
                   "<parameter={{ k }}>\n{% if v is mapping or (v is iterable and v is not string) %}{{ v | tojson }}"
                   "{% else %}{{ v }}{% endif %}\n</parameter>\n{% endfor %}</function>\n</tool_call>",
    # GLM-4.5 / 4.7
    "glm47": "<tool_call>{{ tc.function.name }}\n{% for k, v in tc.function.arguments.items() %}"
             "<arg_key>{{ k }}</arg_key>\n<arg_value>{% if v is string %}{{ v }}{% else %}{{ v | tojson }}{% endif %}"
             "</arg_value>\n{% endfor %}</tool_call>",
    # LFM2: Python-style calls
    "pythonic": "<|tool_call_start|>[{{ tc.function.name }}({% for k, v in tc.function.arguments.items() %}"
                "{{ k }}={{ v | tojson }}{% if not loop.last %}, {% endif %}{% endfor %})]<|tool_call_end|>",
}


class StubTokenizer:
    """What ChatTemplate.tool_call_shape uses of mlx-lm's TokenizerWrapper."""

    has_chat_template = True
    has_thinking = False

    def __init__(self, family):
        env = jinja2.Environment()
        env.filters["tojson"] = lambda v: json.dumps(v)
        self.template = env.from_string(_BASE.replace("CALL", CALLS[family]))
        m = importlib.import_module(f"mlx_lm.tool_parsers.{family}")
        self.tool_call_start, self.tool_call_end, self.parse = m.tool_call_start, m.tool_call_end, m.parse_tool_call

    def apply_chat_template(self, messages, add_generation_prompt=False, tools=None, tokenize=False, **kw):
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools)


def spell(shape, name, args):
    """A call as the grammar spells it in `shape`."""
    text = shape["head"] + name + shape["mid"]
    p = shape.get("params")
    if p is None:
        return text + json.dumps(args) + shape["tail"]
    text += p["sep"].join(p["open"] + k + p["mid"] + (v if isinstance(v, str) and not p["quoted"] else json.dumps(v))
                          + p["close"] for k, v in args.items())
    return text + shape["tail"]


def roundtrip(family, name, args):
    tk = StubTokenizer(family)
    shape = ChatTemplate(tk, None).tool_call_shape()
    assert shape is not None, family
    assert shape["head"].startswith(shape["start"]) and shape["start"] == tk.tool_call_start
    text = spell(shape, name, args)
    types = {str: "string", int: "integer", dict: "object", list: "array", bool: "boolean"}
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {"type": types[type(v)]} for k, v in args.items()}}}}]
    sp = Splitter(tool_start=tk.tool_call_start, tool_end=tk.tool_call_end, parse_tool=tk.parse, tools=tools)
    out = sp.feed("Sure. " + text) + sp.finish()
    calls = [json.loads(s) for kind, s in out if kind == "tool"]
    assert calls == [{"name": name, "arguments": args}], (family, shape, out)


def test_json_argument_formats_round_trip_through_their_parsers():
    args = {"city": "Oslo", "days": 3, "opts": {"units": "metric", "tags": ["a", "b"]}}
    for family in ("json_tools", "mistral"):
        roundtrip(family, "get_weather", args)
        roundtrip(family, "set-alarm_2", {})
        assert "params" not in ChatTemplate(StubTokenizer(family), None).tool_call_shape()


def test_parameter_list_formats_round_trip_through_their_parsers():
    args = {"city": "Oslo <b>", "days": 3, "sunny": True, "opts": {"units": "metric", "tags": ["a", "b"]}}
    for family, quoted, sep in (("qwen3_coder", False, ""), ("glm47", False, ""), ("pythonic", True, ", ")):
        shape = ChatTemplate(StubTokenizer(family), None).tool_call_shape()
        assert shape["params"]["quoted"] == quoted and shape["params"]["sep"] == sep, shape
        roundtrip(family, "get_weather", args)
        roundtrip(family, "get_weather", {"city": "Rome"})
        roundtrip(family, "get_weather", {})

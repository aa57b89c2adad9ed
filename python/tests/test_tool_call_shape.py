"""ChatTemplate.tool_call_shape: the text around a call's name and
arguments, read off the model's own template, for the formats whose
arguments are JSON. A call spelled in that shape must parse back through the
family's own parser (what the Rust grammar relies on: src/constrain.rs);
formats whose arguments are not JSON have no shape."""
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
    # Qwen3-Coder: arguments as XML parameters, not JSON
    "qwen3_coder": "<tool_call>\n<function={{ tc.function.name }}>\n{% for k, v in tc.function.arguments.items() %}"
                   "<parameter={{ k }}>\n{{ v }}\n</parameter>\n{% endfor %}</function>\n</tool_call>",
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


def roundtrip(family, name, args):
    tk = StubTokenizer(family)
    shape = ChatTemplate(tk, None).tool_call_shape()
    assert shape is not None, family
    assert shape["head"].startswith(shape["start"]) and shape["start"] == tk.tool_call_start
    text = shape["head"] + name + shape["mid"] + json.dumps(args) + shape["tail"]
    sp = Splitter(tool_start=tk.tool_call_start, tool_end=tk.tool_call_end, parse_tool=tk.parse, tools=[])
    out = sp.feed("Sure. " + text) + sp.finish()
    calls = [json.loads(s) for kind, s in out if kind == "tool"]
    assert calls == [{"name": name, "arguments": args}], (family, shape, out)


def test_json_argument_formats_round_trip_through_their_parsers():
    args = {"city": "Oslo", "days": 3, "opts": {"units": "metric", "tags": ["a", "b"]}}
    for family in ("json_tools", "mistral"):
        roundtrip(family, "get_weather", args)
        roundtrip(family, "set-alarm_2", {})


def test_formats_without_json_arguments_have_no_shape():
    assert ChatTemplate(StubTokenizer("qwen3_coder"), None).tool_call_shape() is None

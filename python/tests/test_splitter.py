"""The shim's output splitter (text / thinking / tool calls) with fixed
strings in several model families' tool-call formats, parsed by mlx-lm's own
parsers, fed whole and in fragments."""
import importlib
import json

from pensieve_shim import Splitter

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def family(name, **kw):
    m = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    return Splitter(tool_start=m.tool_call_start, tool_end=m.tool_call_end, parse_tool=m.parse_tool_call,
                    tools=TOOLS, **kw)


def run(sp, text, step=None):
    """Feeds `text` in fragments of `step` chars (all at once if None)."""
    out = []
    chunks = [text] if step is None else [text[i:i + step] for i in range(0, len(text), step)]
    for c in chunks:
        out += sp.feed(c)
    out += sp.finish()
    merged = []
    for kind, s in out:
        if merged and merged[-1][0] == kind and kind != "tool":
            merged[-1] = (kind, merged[-1][1] + s)
        else:
            merged.append((kind, s))
    return [(k, json.loads(s) if k == "tool" else s) for k, s in merged]


CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
def test_json_tools_call_after_text():
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for step in (None, 1, 3, 7):
        assert run(family("json_tools"), text, step) == [("text", "Let me check."), ("tool", CALL)], step


def test_json_tools_two_calls():
    one = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    two = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
    got = run(family("json_tools"), one + "\n" + two, 5)
    assert got == [("tool", CALL), ("text", "\n"),
                   ("tool", {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}})], got


def test_malformed_call_is_text():
    text = '<tool_call>{"name": "get_weather", "argu</tool_call> done'
    got = run(family("json_tools"), text, 4)
    assert got == [("text", text)], got


def test_cut_off_call_is_text():
    text = 'ok <tool_call>{"name": "get_weather", "arguments": {"ci'
    got = run(family("json_tools"), text, 2)
    assert got == [("text", text)], got


def test_no_tools_means_no_parsing():
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    sp = Splitter(tool_start="<tool_call>", tool_end="</tool_call>", parse_tool=None)
    assert run(sp, text, 3) == [("text", text)]


def test_mistral_format():
    text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
    got = run(family("mistral"), text, 4)
    assert got == [("tool", CALL)], got


def test_pythonic_format():
    text = 'Sure.<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'
    got = run(family("pythonic"), text, 6)
    assert got == [("text", "Sure."), ("tool", CALL)], got


def test_qwen3_coder_format():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    got = run(family("qwen3_coder"), text, 5)
    assert got == [("tool", CALL)], got


def test_glm47_format():
    text = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
    got = run(family("glm47"), text, 5)
    assert got == [("tool", CALL)], got


def test_thinking_hidden_or_shown():
    text = "<think>Let me think.</think>The answer is 4."
    for show, want in ((False, [("text", "The answer is 4.")]),
                       (True, [("thinking", "Let me think."), ("text", "The answer is 4.")])):
        sp = Splitter(think_start="<think>", think_end="</think>", show_thinking=show)
        assert run(sp, text, 3) == want, (show, run(Splitter(think_start="<think>", think_end="</think>", show_thinking=show), text, 3))


def test_thinking_opened_by_the_prompt():
    sp = Splitter(think_start="<think>", think_end="</think>", state="thinking", show_thinking=True)
    assert run(sp, "hmm</think>4", 2) == [("thinking", "hmm"), ("text", "4")]


def test_stray_think_end_is_dropped():
    sp = Splitter(think_start="<think>", think_end="</think>", state="thinking", show_thinking=True)
    assert run(sp, "a</think>b</think></think>c", 3) == [("thinking", "a"), ("text", "bc")]


def test_thinking_then_tool_call():
    m = importlib.import_module("mlx_lm.tool_parsers.json_tools")
    sp = Splitter(tool_start=m.tool_call_start, tool_end=m.tool_call_end, parse_tool=m.parse_tool_call, tools=TOOLS,
                  think_start="<think>", think_end="</think>", show_thinking=True)
    text = '<think>need weather</think><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert run(sp, text, 4) == [("thinking", "need weather"), ("tool", CALL)]


def test_marker_lookalikes_are_released():
    text = "a <tool-call> b <tool_cal"
    assert run(family("json_tools"), text, 2) == [("text", text)]

"""One request's decoded text split into text, thinking and tool calls by the
model's own markers."""

import json

class Splitter:
    """Splits one request's decoded text into ("text" | "thinking" | "tool", str)
    pieces, using the model family's markers (from mlx-lm's tokenizer
    wrapper) and its tool parser. Markers may arrive split across tokens, so
    a tail that could still become a marker is held back.

    A tool call body that does not parse is given back as plain text: output
    that merely looks like a call never fails the request.
    """

    def __init__(self, tool_start=None, tool_end=None, parse_tool=None, tools=None,
                 think_start=None, think_end=None, state="text", show_thinking=False):
        self.tool_start, self.tool_end = tool_start or None, tool_end
        self.parse_tool, self.tools = parse_tool, tools
        self.think_start, self.think_end = think_start or None, think_end or None
        self.state = state
        self.show_thinking = show_thinking
        self.buf = ""
        self.tool_body = ""
        self.calls = 0

    def _markers(self):
        if self.state == "text":
            # A stray end-of-thinking marker in the answer is a control token,
            # not text: it is dropped.
            return [m for m in (self.tool_start if self.parse_tool else None, self.think_start, self.think_end) if m]
        if self.state == "thinking":
            return [self.think_end] if self.think_end else []
        return [self.tool_end] if self.tool_end else []

    def feed(self, text):
        self.buf += text
        out = []
        while True:
            markers = self._markers()
            hits = [(self.buf.find(m), m) for m in markers if m in self.buf]
            if not hits:
                keep = self._partial(markers)
                self._emit(out, self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            pos, marker = min(hits)
            self._emit(out, self.buf[:pos])
            self.buf = self.buf[pos + len(marker):]
            self._transition(out, marker)

    def finish(self):
        out = []
        self._emit(out, self.buf)
        self.buf = ""
        if self.state == "tool":
            # Cut off (max_tokens) or a format without an end marker.
            self._close_tool(out, terminated=not self.tool_end)
        return out

    def _partial(self, markers):
        best = 0
        for m in markers:
            for n in range(min(len(m) - 1, len(self.buf)), best, -1):
                if m.startswith(self.buf[-n:]):
                    best = n
                    break
        return best

    def _emit(self, out, text):
        if not text:
            return
        if self.state == "tool":
            self.tool_body += text
        elif self.state == "thinking":
            if self.show_thinking:
                out.append(("thinking", text))
        else:
            out.append(("text", text))

    def _transition(self, out, marker):
        if self.state == "text" and marker == self.tool_start:
            self.state, self.tool_body = "tool", ""
        elif self.state == "text" and marker == self.think_end:
            pass
        elif self.state == "text":
            self.state = "thinking"
        elif self.state == "thinking":
            self.state = "text"
        else:
            self._close_tool(out, terminated=True)

    def _close_tool(self, out, terminated):
        body, self.tool_body, self.state = self.tool_body, "", "text"
        calls = None
        if terminated:
            try:
                parsed = self.parse_tool(body, self.tools)
                calls = parsed if isinstance(parsed, list) else [parsed]
                calls = [
                    {"name": c["name"], "arguments": as_object(c.get("arguments", {}))}
                    for c in calls
                ]
                if not all(isinstance(c["name"], str) and isinstance(c["arguments"], dict) for c in calls):
                    calls = None
            except Exception:
                calls = None
        if calls is None:
            out.append(("text", (self.tool_start or "") + body + (self.tool_end or "" if terminated else "")))
            return
        for c in calls:
            self.calls += 1
            out.append(("tool", json.dumps(c, ensure_ascii=False)))


def as_object(args):
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


"""Chat-template helpers: request text that spells a control token stays text."""

import copy
import os
import re

from pensieve_shim.sampling import think_end
from pensieve_shim.splitter import Splitter

class SpecialText:
    """The tokenizer's special (control) tokens as text, kept from becoming
    control tokens when request text spells them: a user message, a tool
    result or a fetched web page must not be able to forge a turn.

    Before the template renders, each occurrence inside the request's
    strings becomes a private-use placeholder; afterwards the text is put
    back and its spans remembered; the whole string is tokenized once, and a
    special token exactly on a remembered span is replaced by the tokens of
    its text as plain text. src/tokenizer.rs does the same; the start-up
    probes check that both agree."""

    START, END, PLANE = "\ue000", "\ue001", 0xF0000

    def __init__(self, backend):
        added = backend.get_added_tokens_decoder()
        self.texts = sorted({t.content for t in added.values() if t.special and t.content})
        self.ids = {i for i, t in added.items() if t.special}
        plain = copy.deepcopy(backend)
        plain.encode_special_tokens = True
        self.plain = [plain.encode(t, add_special_tokens=False).ids for t in self.texts]
        index = {t: i for i, t in enumerate(self.texts)}
        # Longest first: at each position the longest special wins.
        alternatives = sorted(self.texts, key=len, reverse=True)
        self._find = re.compile("|".join(re.escape(t) for t in alternatives))
        self._placeholder = {t: f"{self.START}{chr(self.PLANE + i)}{self.END}" for t, i in index.items()}
        self._marked = re.compile(f"{self.START}([\U000F0000-\U000FFFFD]){self.END}")

    def neutralize(self, v):
        """(v with special texts in its string values replaced, how many)."""
        if isinstance(v, str):
            n = 0

            def swap(m):
                nonlocal n
                n += 1
                return self._placeholder[m.group(0)]

            out = self._find.sub(swap, v)
            return out, n
        if isinstance(v, list):
            pairs = [self.neutralize(x) for x in v]
            return [x for x, _ in pairs], sum(n for _, n in pairs)
        if isinstance(v, dict):
            pairs = {k: self.neutralize(x) for k, x in v.items()}
            return {k: x for k, (x, _) in pairs.items()}, sum(n for _, n in pairs.values())
        return v, 0

    def tokenize(self, backend, rendered):
        """Token ids of the rendered text with its placeholders put back as
        plain text."""
        out, spans, last = [], [], 0
        length = 0
        for m in self._marked.finditer(rendered):
            i = ord(m.group(1)) - self.PLANE
            if i >= len(self.texts):
                continue
            out.append(rendered[last : m.start()])
            length += m.start() - last
            spans.append((length, length + len(self.texts[i]), i))
            out.append(self.texts[i])
            length += len(self.texts[i])
            last = m.end()
        out.append(rendered[last:])
        enc = backend.encode("".join(out), add_special_tokens=False)
        ids, k = [], 0
        for tok, (start, end) in zip(enc.ids, enc.offsets):
            while k < len(spans) and spans[k][0] < start:
                k += 1
            if k < len(spans) and spans[k][0] == start and spans[k][1] == end and tok in self.ids:
                ids.extend(self.plain[spans[k][2]])
                k += 1
            else:
                ids.append(tok)
        return ids


class ChatTemplate:
    """The model's chat template and tokenizer as the engine uses them:
    rendering prompts (control-token text kept as text), what the Rust side
    needs to render identically, how late system messages fit, the output
    splitter for a request, and the tokens that open a forced tool call."""

    def __init__(self, tokenizer, specials):
        self.tokenizer = tokenizer
        self.specials = specials  # SpecialText, or None when text may spell control tokens

    def render(self, p):
        """The internal prompt (messages + tools, or a raw prompt) as token
        ids, through the model's own chat template."""
        if p.get("raw_prompt") is not None:
            return self.tokenizer.encode(p["raw_prompt"])
        messages = p["messages"]
        tools = p.get("tools")
        marked = 0
        if self.specials is not None and self.tokenizer.has_chat_template:
            messages, n = self.specials.neutralize(messages)
            tools, m = self.specials.neutralize(tools)
            marked = n + m
        kwargs = {}
        if tools:
            kwargs["tools"] = tools
        if self.tokenizer.has_chat_template:
            kwargs.update(self.template_kwargs())
            if p.get("enable_thinking") is not None:
                kwargs[getattr(self.tokenizer, "_thinking_kwarg", "enable_thinking")] = p["enable_thinking"]
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
            if marked:
                return self.specials.tokenize(self.tokenizer._tokenizer.backend_tokenizer, text)
            return self.tokenizer.encode(text, add_special_tokens=False)
        # No template: a plain transcript, so base models still work.
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        return self.tokenizer.encode(text + "assistant: ")

    def template_kwargs(self):
        """Template variables mlx-lm adds, so Rust can render identically."""
        kwarg = getattr(self.tokenizer, "_thinking_kwarg", "enable_thinking")
        return {kwarg: bool(self.tokenizer.has_thinking)}

    def template_info(self):
        """What the Rust side needs to tokenize prompts itself (src/tokenizer.rs)."""
        hf = self.tokenizer._tokenizer
        folder = getattr(hf, "name_or_path", None) or ""
        tok_file = os.path.join(folder, "tokenizer.json")
        template = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else None
        specials = {
            k: v for k, v in (getattr(hf, "special_tokens_map", None) or {}).items() if isinstance(v, str)
        }
        tk = self.tokenizer
        return {
            "tokenizer_file": tok_file if os.path.exists(tok_file) else None,
            "chat_template": template if tk.has_chat_template else None,
            "special_tokens": specials,
            "template_kwargs": self.template_kwargs(),
            "thinking_kwarg": getattr(tk, "_thinking_kwarg", "enable_thinking"),
            "tool_call_start": tk.tool_call_start,
            "tool_call_end": tk.tool_call_end,
            "tool_parser": self.tool_parser_type(),
            "tool_call_shape": self.tool_call_shape(),
        }

    def tool_call_shape(self):
        """How one tool call is spelled in this model's format, as its
        template renders one, for the Rust side to wrap a tool's schema in
        (src/constrain.rs). A dict with `start` (the call marker, where
        `head` begins) and either
        - arguments as one JSON object: head + name + mid + JSON + tail, or
        - arguments as a list of parameters (Qwen3-Coder's `<parameter=k>`,
          GLM's `<arg_key>`, LFM2's Python-style `name(k=v, ...)`):
          head + name + mid, then the arguments joined by `params.sep`, each
          `params.open` + key + `params.mid` + value + `params.close`, then
          tail; values as JSON, strings raw unless `params.quoted`.
        None when the template renders no calls this way."""
        tk = self.tokenizer
        if not tk.tool_call_start or not tk.has_chat_template:
            return None
        name, k1, k2, v1, v2 = "pnsvtoolname", "pnsvkeyone", "pnsvkeytwo", 73901, "pnsvstrval"
        turn = self._render_call(name, {k1: v1, k2: v2})
        if turn is None:
            return None
        s = turn.find(tk.tool_call_start)
        n = turn.find(name, s + 1) if s >= 0 else -1
        a = turn.find(k1, n) if n >= 0 else -1
        b = turn.find(k2, a) if a >= 0 else -1
        x = turn.find(str(v1), a) if a >= 0 else -1
        y = turn.find(v2, b) if b >= 0 else -1
        if min(s, n, a, b, x, y) < 0:
            return None
        shape = {"start": tk.tool_call_start, "head": turn[s:n]}
        open_ = turn.rfind("{", n + len(name), a)
        if open_ >= 0:
            close = turn.find("}", y)
            end = self._call_end(turn, close)
            if close < 0 or end is None:
                return None
            return dict(shape, mid=turn[n + len(name):open_], tail=turn[close + 1:end])
        # A parameter list. The string value may be quoted (a JSON value).
        quoted = turn[y - 1:y] == '"' and turn[y + len(v2):y + len(v2) + 1] == '"'
        y, v2_end = (y - 1, y + len(v2) + 1) if quoted else (y, y + len(v2))
        end = self._call_end(turn, v2_end)
        if end is None or turn[a + len(k1):x] != turn[b + len(k2):y]:
            return None
        # name..k1 is mid + open; v1..k2 is close + sep + open; v2..the end
        # is close + tail. Any split that rebuilds those texts spells the
        # same calls: `open` is their longest common end, `close` the longest
        # common start of the other two.
        g1, g2, g3 = turn[n + len(name):a], turn[x + len(str(v1)):b], turn[v2_end:end]
        o = 0
        while o < min(len(g1), len(g2)) and g1[len(g1) - 1 - o] == g2[len(g2) - 1 - o]:
            o += 1
        between = g2[: len(g2) - o]
        c = 0
        while c < min(len(between), len(g3)) and between[c] == g3[c]:
            c += 1
        params = {"open": g1[len(g1) - o:], "mid": turn[a + len(k1):x], "close": between[:c], "sep": between[c:],
                  "quoted": quoted}
        if not (params["open"] or params["sep"]) or not (params["close"] or params["sep"]):
            return None  # nothing would tell one argument's end from the next one's start
        return dict(shape, mid=g1[: len(g1) - o], tail=g3[c:], params=params)

    def _render_call(self, name, arguments):
        """The text an assistant turn with one call adds after the prompt."""
        tk = self.tokenizer
        props = {k: {"type": "string" if isinstance(v, str) else "integer"} for k, v in arguments.items()}
        tools = [{"type": "function", "function": {"name": name, "description": "d", "parameters": {
            "type": "object", "properties": props}}}]
        user = [{"role": "user", "content": "x"}]
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}]}
        kw = dict(tools=tools, tokenize=False, **self.template_kwargs())
        try:
            base = tk.apply_chat_template(user, add_generation_prompt=True, **kw)
            full = tk.apply_chat_template(user + [call], add_generation_prompt=False, **kw)
        except Exception:
            return None
        return full[len(base):] if full.startswith(base) else None

    def _call_end(self, turn, pos):
        """Where the call that ends its arguments at `pos` ends: after the
        end marker, or (formats without one) after closing brackets."""
        end_marker = self.tokenizer.tool_call_end
        if end_marker:
            e = turn.find(end_marker, pos)
            return None if e < 0 else e + len(end_marker)
        end = pos + 1
        while end < len(turn) and turn[end] in "}]":
            end += 1
        return end

    def late_system_mode(self):
        """How this template takes a system message in mid-conversation:
        "system" (rendered where it stands), "user" (dropped or refused
        there, but consecutive user turns are fine: it becomes its own user
        turn) or "merge" (roles must alternate: it joins a user turn)."""
        if not self.tokenizer.has_chat_template:
            return "system"  # the plain transcript prints every role in place
        kw = dict(add_generation_prompt=True, tokenize=False, **self.template_kwargs())
        a, probe, b = "PNSVUSERA", "PNSVPROBE", "PNSVUSERB"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": a}, {"role": "system", "content": probe},
                 {"role": "user", "content": b}], **kw)
            if a in text and probe in text and text.index(a) < text.index(probe) < text.index(b):
                return "system"
        except Exception:
            pass
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": a}, {"role": "user", "content": b}], **kw)
            if a in text and b in text:
                return "user"
        except Exception:
            pass
        return "merge"

    def tool_parser_type(self):
        parser = self.tokenizer.tool_parser
        mod = getattr(parser, "__module__", "") or ""
        return mod.rsplit(".", 1)[-1] if parser else None

    def splitter(self, tokens, p):
        tk = self.tokenizer
        state = "text"
        if tk.has_thinking and tk.think_start_tokens:
            # Templates that open the thinking block in the generation prompt.
            n = len(tk.think_start_tokens)
            last_start = tk.rfind_think_start(tokens, start=max(0, len(tokens) - 16))
            if last_start != -1 and last_start + n >= len(tokens) - 2:
                state = "thinking"
        sp = Splitter(
            tool_start=tk.tool_call_start if p.get("tools") else None,
            tool_end=tk.tool_call_end,
            parse_tool=tk.tool_parser if p.get("tools") else None,
            tools=p.get("tools"),
            think_start=tk.think_start if tk.has_thinking else None,
            think_end=think_end(tk) if tk.has_thinking else None,
            state=state,
            show_thinking=bool(p.get("thinking")),
        )
        return sp

    def forced_call_tokens(self, tools, name):
        """The tokens that open a tool call in this model's own format, as
        its template renders one: up to and including the call marker (any
        tool), or through the tool's name (a named tool). Forcing the model's
        natural tokens, rather than appending text to the prompt, keeps the
        continuation in distribution."""
        tk = self.tokenizer
        call_name = name or tools[0]["function"]["name"]
        user = [{"role": "user", "content": "x"}]
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": call_name, "arguments": {}}}]}
        kw = dict(tools=tools, tokenize=False, **self.template_kwargs())
        base = tk.apply_chat_template(user, add_generation_prompt=True, **kw)
        full = tk.apply_chat_template(user + [call], add_generation_prompt=False, **kw)
        if not full.startswith(base) or not tk.tool_call_start:
            return None
        turn = full[len(base):]
        start = turn.find(tk.tool_call_start)
        if start < 0:
            return None
        end = start + len(tk.tool_call_start)
        if name:
            at = turn.find(name, end)
            if at < 0:
                return None
            end = at + len(name)
        base_ids = tk.encode(base, add_special_tokens=False)
        ids = tk.encode(full, add_special_tokens=False)
        if ids[: len(base_ids)] != base_ids:
            return None
        forced = []
        for t in ids[len(base_ids):]:
            forced.append(t)
            if len(tk.decode(forced)) >= end:
                return forced
        return None


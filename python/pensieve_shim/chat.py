"""Chat-template helpers: request text that spells a control token stays text."""

import copy
import re

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


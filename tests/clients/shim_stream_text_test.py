"""Streamed text when characters are split across tokens: the engine's own
per-token path (Engine._emit: mlx-lm's streaming detokenizer, then the
output splitter) on a real byte-level BPE tokenizer, fed one token at a
time as generation feeds it. No piece may carry half a character (U+FFFD)
and the pieces must join to the exact text.

Usage: shim_stream_text_test.py PATH_TO_python/ MODEL_FOLDER
"""
import json
import os
import sys

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import check, done  # noqa: E402
import pensieve_shim as ps  # noqa: E402



eng = ps.Engine(sys.argv[2], json.dumps({}))
tok = eng.tokenizer
for text in ("Paris: 晴れ, 22°C ☀️ — café 🎉 naïve", "日本語のテキスト", "emoji 👩‍👩‍👧‍👦 family", "ünïcödé ß ø ǅ"):
    ids = tok.encode(text, add_special_tokens=False)
    # The premise: some tokens hold only part of a character.
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    check(f"{text!r}: characters split across tokens", partial, ids)
    seq = ps.Seq(1, tokens=[], todo=[], cache=None, max_tokens=len(ids), sampler=None, processors=[],
                  detok=tok.detokenizer, splitter=ps.Splitter(), fault_after=None)
    out = []
    finished = [eng._emit(seq, t, out) for t in ids]
    check(f"{text!r}: finished at max_tokens, not before", finished == [False] * (len(ids) - 1) + [True], finished)
    pieces = [p for (_rid, items, _finish, _err, _ok, *_) in out for (kind, p) in items if kind == "text"]
    joined = "".join(pieces)
    check(f"{text!r}: pieces join to the text", joined == text, (joined, pieces))
    bad = [p for p in pieces if "\ufffd" in p]
    check(f"{text!r}: no piece carries half a character", not bad, bad)
    check(f"{text!r}: streamed in several pieces", len(pieces) > 3, pieces)
    print(f"{text!r}: {len(ids)} tokens ({len(partial)} partial characters) -> {len(pieces)} pieces")

done()

"""A scripted 20-turn agent session in Claude Code's request shape, against a
running pensieve: the real Claude Code system blocks and 12 tools (from
tests/fixtures/claude-code-turns.json), its environment block as a late system
message, `thinking: {type: adaptive, display: omitted}`, tool_use /
tool_result turns with thinking blocks (with signatures) in the history, a
per-request billing hash, and a `<total_tokens>N tokens left</total_tokens>`
countdown after each tool result. Prints per turn: prompt tokens,
cache_read_input_tokens, the share served from the prefix cache, and TTFT.

    benches/agent_session.sh                      # builds, starts the server, runs this
    .venv/bin/python benches/agent_session.py --url http://127.0.0.1:7777 [--turns 20]
"""

import argparse
import http.client
import json
import os
import time
import urllib.parse

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "claude-code-turns.json")


def stream(url, body):
    """(usage dict, text, ttft seconds) of one streamed /v1/messages call."""
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=900)
    t0 = time.perf_counter()
    c.request("POST", "/v1/messages?beta=true", json.dumps(body),
              {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": "bench"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:500]!r}")
    usage, text, ttft, event = {}, "", None, None
    for raw in r:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            d = json.loads(line[6:])
            if event == "message_start":
                usage = dict(d["message"]["usage"])
            elif event == "content_block_delta" and ttft is None:
                ttft = time.perf_counter() - t0
            if event == "content_block_delta" and d["delta"].get("type") == "text_delta":
                text += d["delta"]["text"]
            if event == "message_delta":
                usage["output_tokens"] = d["usage"]["output_tokens"]
    return usage, text, ttft or (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7777")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    first = json.load(open(FIXTURE))["requests"][0]["body"]
    system, tools = first["system"], first["tools"]
    messages = [first["messages"][0], first["messages"][1]]  # the user's task, then the environment block
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'cached %':>8} {'new':>6} {'TTFT ms':>8}")
    rows = []
    for turn in range(1, args.turns + 1):
        sys_blocks = [dict(b) for b in system]
        # The billing header carries a per-request hash in some versions.
        sys_blocks[0]["text"] = sys_blocks[0]["text"].rstrip(";") + f"; cch={turn * 7919 % 100000:05d};"
        body = {"model": "claude-opus-5-5", "max_tokens": args.max_tokens, "stream": True, "system": sys_blocks,
                "tools": tools, "messages": messages, "thinking": {"type": "adaptive", "display": "omitted"},
                "metadata": first.get("metadata", {}), "temperature": 0}
        usage, text, ttft = stream(args.url, body)
        prompt = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
        cached = usage.get("cache_read_input_tokens", 0)
        rows.append((turn, prompt, cached, ttft))
        print(f"{turn:>4} {prompt:>7} {cached:>7} {100 * cached / max(prompt, 1):>7.1f}% {prompt - cached:>6} {ttft * 1000:>8.0f}")
        tool_id = f"toolu_{turn:04d}"
        messages = messages + [
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "", "signature": f"sig{turn}"},
                {"type": "text", "text": text or "Let me look."},
                {"type": "tool_use", "id": tool_id, "name": "Read", "input": {"file_path": f"/repo/src/file{turn}.rs"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": tool_id,
                 "content": f"fn f{turn}() {{ /* file {turn}: " + "alpha bravo charlie delta " * 20 + "*/ }"},
            ]},
            {"role": "system", "content": f"<total_tokens>{180000 - turn * 1500} tokens left</total_tokens>"},
        ]
    later = [r for r in rows if r[0] >= 2]
    worst = min(100 * c / p for _, p, c, _ in later) if later else 0
    ttfts = [t for *_, t in later]
    print(f"turns 2-{args.turns}: least served from the prefix cache {worst:.1f}% (goal >= 95%); "
          f"TTFT {min(ttfts) * 1000:.0f}-{max(ttfts) * 1000:.0f} ms (first turn {rows[0][3] * 1000:.0f} ms)")


if __name__ == "__main__":
    main()

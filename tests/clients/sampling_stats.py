"""top_k / top_p shape the distribution the way they should: first tokens
drawn through the server (OpenAI dialect, fixed seeds 0..N-1, temperature
1.5) against the model's exact next-token probabilities, computed here from
the same model folder and the same prompt ids.

- top_k=1: always the most likely token;
- top_k=3: only the 3 most likely, in proportion to their probabilities;
- top_p=0.6: only the smallest set of most likely tokens holding 0.6 of the
  mass, in proportion;
- neither: the full distribution (tokens beyond the top 3 appear).

Usage: sampling_stats.py PATH_TO_python/ BASE_URL API_KEY
"""
import json
import os
import sys
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import check, done  # noqa: E402
import mlx.core as mx  # noqa: E402

import pensieve_shim as ps  # noqa: E402

BASE, KEY = sys.argv[2], sys.argv[3]
N, T = 200, 1.5
CONTENT = "tell me a story"


def call(path, body=None):
    req = urllib.request.Request(BASE + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def draw(extra):
    def one(seed):
        body = {"model": "m", "max_tokens": 1, "temperature": T, "seed": seed,
                "messages": [{"role": "user", "content": CONTENT}], **extra}
        r = call("/v1/chat/completions", body)
        return r["choices"][0]["message"]["content"], r["usage"]["prompt_tokens"]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(N)))
    return Counter(t for t, _ in got), got[0][1]


folder = call("/health")["model"]["path"]
eng = ps.Engine(folder, json.dumps({}))
ids = eng.render(json.dumps({"messages": [{"role": "user", "content": CONTENT}]}))
probs = mx.softmax(eng.model(mx.array([ids]))[0, -1].astype(mx.float32) / T).tolist()
order = sorted(range(len(probs)), key=lambda i: -probs[i])
label = {i: eng.tokenizer.decode([i]) for i in order}


def expected(kept):
    """Label -> probability over the token ids `kept`, renormalized."""
    mass = sum(probs[i] for i in kept)
    out = Counter()
    for i in kept:
        out[label[i]] += probs[i] / mass
    return out


def tv(counts, want):
    """Total variation distance between drawn frequencies and `want`."""
    keys = set(counts) | set(want)
    return 0.5 * sum(abs(counts[k] / N - want.get(k, 0.0)) for k in keys)


nucleus, cum = [], 0.0
for i in order:
    nucleus.append(i)
    cum += probs[i]
    if cum >= 0.6:
        break
top3 = expected(order[:3])
print(f"model: top tokens {[(label[i], round(probs[i], 3)) for i in order[:5]]}; nucleus(0.6) {[label[i] for i in nucleus]}")

drawn, prompt_tokens = draw({"top_k": 1})
check("the server's prompt is the one scored here", prompt_tokens == len(ids), (prompt_tokens, len(ids)))
check("top_k=1 is the most likely token", set(drawn) == {label[order[0]]}, drawn)

drawn, _ = draw({"top_k": 3})
check("top_k=3 draws only the 3 most likely", set(drawn) <= set(top3), (drawn, top3))
check("top_k=3 in proportion", tv(drawn, top3) < 0.1, (tv(drawn, top3), drawn, top3))
print(f"top_k=3: {dict(drawn)} (expected {({k: round(v * N) for k, v in top3.items()})}), TV {tv(drawn, top3):.3f}")

want = expected(nucleus)
drawn, _ = draw({"top_p": 0.6})
check("top_p=0.6 draws only the nucleus", set(drawn) <= set(want), (drawn, want))
check("top_p=0.6 in proportion", tv(drawn, want) < 0.1, (tv(drawn, want), drawn, want))
check("top_p=0.6 keeps more than one token here", len(nucleus) > 1, nucleus)
print(f"top_p=0.6: {dict(drawn)} (expected {({k: round(v * N) for k, v in want.items()})}), TV {tv(drawn, want):.3f}")

full = expected(order)
drawn, _ = draw({})
outside = sum(c for t, c in drawn.items() if t not in top3)
check("unrestricted draws go beyond the top 3", outside > 0, drawn)
# Labels the model gives real mass (the rest pooled), drawn in proportion.
big = {k for k, v in full.items() if v >= 0.02}
pooled = Counter({k: c for k, c in drawn.items() if k in big})
pooled["other"] = sum(c for k, c in drawn.items() if k not in big)
want = Counter({k: v for k, v in full.items() if k in big})
want["other"] = 1.0 - sum(want.values())
check("unrestricted in proportion", tv(pooled, want) < 0.1, (tv(pooled, want), pooled, want))
print(f"unrestricted: {dict(pooled)} (expected {({k: round(v * N) for k, v in want.items()})}), TV {tv(pooled, want):.3f}")

done()

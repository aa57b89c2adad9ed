"""Load / soak test against a pensieve server on loopback (bounded in count and time).

Mixes streamed and non-streamed generations, clients that disconnect mid-stream,
malformed bodies, token counts and health checks at a fixed concurrency. Prints
failures by kind (everything but well-formed 529s is a failure), process RSS
before and after (from /health), and the active-slot gauge from /metrics.

    benches/soak.sh                       # builds, starts the server, runs 500 requests at c=16
    .venv/bin/python benches/soak.py --url http://127.0.0.1:7777 --requests 500 --concurrency 16
"""

import argparse
import collections
import http.client
import json
import random
import threading
import time
import urllib.parse


def conn(url, timeout=120):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def get_json(url, path):
    c = conn(url, 10)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, json.loads(r.read())


def metric(url, name):
    c = conn(url, 10)
    c.request("GET", "/metrics")
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def body(rng, stream, max_tokens=16):
    words = " ".join(rng.choice(["alpha", "bravo", "weather", "city", "paris", "token"]) for _ in range(rng.randint(3, 60)))
    # top_k past the vocabulary once broke sampling for every later request.
    return json.dumps({"model": "soak", "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7]), "stream": stream,
                       "top_k": rng.choice([0, 40, 1 << 20]),
                       "messages": [{"role": "user", "content": words}]})


MALFORMED = [
    (b"{not json", "application/json"),
    (b"", "application/json"),
    (b'{"model": "m", "max_tokens": 5, "messages": []}', "application/json"),
    (b'{"model": "m", "max_tokens": "lots", "messages": [{"role": "user", "content": "x"}]}', "application/json"),
    (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "wizard", "content": "x"}]}', "application/json"),
    (b"\xff\xfe\x00garbage", "application/json"),
    (b"[" * 5000 + b"]" * 5000, "application/json"),
    (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', "text/plain"),
    (json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 300000}],
                 "stop_sequences": [""]}).encode(), "application/json"),
    # Over the stop-sequence limits: 1 KiB each, 16 KiB together.
    (json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                 "stop_sequences": ["y" * 100_000]}).encode(), "application/json"),
    (json.dumps({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                 "stop_sequences": ["y" * 1024] * 64}).encode(), "application/json"),
    # What a web page can send without a preflight, and what it sends with one.
    (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', None),
    (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', "application/x-www-form-urlencoded"),
    (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', "application/json",
     {"Origin": "https://evil.example"}),
    (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}', "application/json",
     {"Host": "rebound.attacker.example"}),
]


def check_sse(text):
    """Anthropic event grammar: message_start first, message_stop or error last."""
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    if not names or names[0] != "message_start":
        return "stream did not start with message_start"
    if names[-1] not in ("message_stop", "error"):
        return f"stream ended with {names[-1]}"
    for line in text.splitlines():
        if line.startswith("data: "):
            json.loads(line[6:])
    return None


def one(url, kind, rng, failures, counts):
    try:
        c = conn(url)
        if kind == "malformed":
            payload, ctype, *extra = rng.choice(MALFORMED)
            headers = dict(extra[0]) if extra else {}
            if ctype is not None:
                headers["content-type"] = ctype
            if "Host" in headers:
                c.putrequest("POST", "/v1/messages", skip_host=True)
                for k, v in list(headers.items()) + [("content-length", str(len(payload)))]:
                    c.putheader(k, v)
                c.endheaders(payload)
            else:
                c.request("POST", "/v1/messages", payload, headers)
            r = c.getresponse()
            data = r.read()
            if r.status == 529:
                counts["529"] += 1
            elif not (400 <= r.status < 500):
                failures[f"malformed got {r.status}"] += 1
            elif json.loads(data).get("type") != "error":
                failures["malformed: error body not in Anthropic shape"] += 1
            return
        if kind == "count":
            c.request("POST", "/v1/messages/count_tokens", body(rng, False), {"content-type": "application/json"})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                failures[f"count_tokens got {r.status}"] += 1
            return
        if kind == "health":
            c.request("GET", "/health")
            r = c.getresponse()
            r.read()
            if r.status != 200:
                failures[f"health got {r.status}"] += 1
            return
        stream = kind in ("stream", "disconnect")
        c.request("POST", "/v1/messages", body(rng, stream, 200 if kind == "disconnect" else 16),
                  {"content-type": "application/json"})
        r = c.getresponse()
        if r.status == 529:
            counts["529"] += 1
            if r.getheader("retry-after") is None:
                failures["529 without retry-after"] += 1
            r.read()
            return
        if r.status != 200:
            failures[f"{kind} got {r.status}: {r.read()[:120]!r}"] += 1
            return
        if kind == "disconnect":
            r.read(rng.randint(200, 1500))  # a few events, then hang up
            c.close()
            return
        data = r.read().decode()
        if stream:
            err = check_sse(data)
            if err:
                failures[f"stream: {err}"] += 1
        else:
            msg = json.loads(data)
            if msg.get("type") != "message" or msg.get("stop_reason") is None:
                failures["non-stream: bad message"] += 1
        counts["ok"] += 1
    except Exception as e:  # any client-side surprise is a failure kind
        failures[f"{kind}: {type(e).__name__}"] += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7777")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=900, help="hard stop")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if urllib.parse.urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("soak only targets loopback")

    _, h0 = get_json(args.url, "/health")
    rss_before = h0["memory"]["process_rss_bytes"]
    pc_before = h0["memory"]["prompt_cache_bytes"]
    rng = random.Random(args.seed)
    kinds = rng.choices(["stream", "nonstream", "disconnect", "malformed", "count", "health"],
                        weights=[35, 25, 15, 15, 5, 5], k=args.requests)
    failures, counts = collections.Counter(), collections.Counter()
    lock = threading.Lock()
    queue = list(enumerate(kinds))
    deadline = time.time() + args.seconds
    t0 = time.time()

    def worker(wid):
        wrng = random.Random(args.seed * 100 + wid)
        while time.time() < deadline:
            with lock:
                if not queue:
                    return
                _, kind = queue.pop()
            one(args.url, kind, wrng, failures, counts)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0

    # Let cancelled sequences leave the engine, then read the gauges.
    slots = None
    for _ in range(100):
        slots = metric(args.url, "pensieve_slots_in_use")
        if slots == 0:
            break
        time.sleep(0.1)
    _, h1 = get_json(args.url, "/health")
    rss_after = h1["memory"]["process_rss_bytes"]
    pc_after = h1["memory"]["prompt_cache_bytes"]
    done = args.requests - len(queue)
    print(f"{done} requests in {elapsed:.0f} s at concurrency {args.concurrency}: "
          f"{counts['ok']} generations ok, {counts['529']} well-formed 529s")
    print("failures by kind:" + ("" if failures else " none"))
    for k, n in failures.most_common():
        print(f"  {n:5d}  {k}")
    # The prefix cache keeps KV of past prompts by design (up to
    # --prompt-cache-bytes); growth beyond what it accounts for is a leak.
    pc_growth = pc_after - pc_before
    print(f"process RSS before {rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB "
          f"({(rss_after / rss_before - 1) * 100:+.1f} %); prefix cache {pc_before / 2**20:.1f} -> "
          f"{pc_after / 2**20:.1f} MiB; RSS after less cache growth {(rss_after - pc_growth) / 2**20:.1f} MiB "
          f"({((rss_after - pc_growth) / rss_before - 1) * 100:+.1f} %)")
    print(f"active-slot gauge after: {slots}")
    ok = not failures and slots == 0 and rss_after - pc_growth <= rss_before * 1.05 and not queue
    print("SOAK " + ("PASSED" if ok else "FAILED"))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

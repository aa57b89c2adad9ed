"""The Linux CPU path against llama.cpp, on one GGUF file and one thread count (issue 14).

Run through `benches/compare.sh --gguf FILE` (it builds pensieve and installs npm
`node-llama-cpp`, llama.cpp's prebuilt CPU build, into target/llama-cpp; the build never does).
Systems, each on the same file:
  llama.cpp         node-llama-cpp (benches/llama_cpp.mjs): decode after a short prompt, prefill
  pensieve          the server with its CPU kernels (quantized weights stay quantized)
  pensieve-f32      the server with --cpu-kernels off (MLX's own ops, weights dequantized to f32)
Figures: single-stream decode tok/s (greedy, after a short prompt), aggregate decode tok/s with
8 concurrent streams, prefill tok/s at each prompt length (a fresh prompt each time: no prefix
cache), resident memory. Each is the median of --passes runs; single-stream decode is measured in
turns (pensieve, llama.cpp, pensieve, ...), as this VM's speed drifts. Prints a markdown table and the
ratios against the targets; exits 1 when a target is missed.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import health, rss, stop, stream_one, wait_ready  # noqa: E402

WORDS = "alpha bravo charlie delta echo weather city model token server river mountain garden window".split()
STORIES = ["a dragon who learns to cook", "a lighthouse keeper and a storm", "a robot that plants a forest",
           "two friends crossing a desert", "a city under the sea", "a clock that runs backwards",
           "a cat who becomes mayor", "a library with no end"]


def filler(seed, words):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def decode(port, conc, tokens, seed):
    """Aggregate and per-stream decode tok/s of `conc` concurrent greedy stories."""
    results = [dict() for _ in range(conc)]
    threads = []
    t0 = time.perf_counter()
    for i in range(conc):
        msgs = [{"role": "user", "content": f"Write a long story about {STORIES[(seed + i) % len(STORIES)]}."}]
        t = threading.Thread(target=stream_one, args=(port, "anthropic", msgs, tokens, results[i]))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"requests failed: {errors}")
    first = min(r["t_first"] for r in results)
    last = max(r["t_last"] for r in results)
    total = sum(r["tokens"] - 1 for r in results)
    per = [(r["tokens"] - 1) / (r["t_last"] - r["t_first"]) for r in results if r["tokens"] > 1]
    return {"agg": total / (last - first), "stream": statistics.median(per), "tokens": total + conc,
            "wall": time.perf_counter() - t0}


def prefill(port, words, seed):
    """Prefill tok/s of a fresh prompt: its tokens over the time to the first token."""
    r = {}
    msgs = [{"role": "user", "content": filler(seed, words) + "\nWhat is the first word above?"}]
    stream_one(port, "anthropic", msgs, 1, r)
    if "error" in r:
        raise RuntimeError(r["error"])
    # The prompt's token count, as the server counted it.
    return r


def count_tokens(port, words, seed):
    import http.client
    body = {"model": "x", "messages": [{"role": "user", "content": filler(seed, words) + "\nWhat is the first word above?"}]}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/messages/count_tokens", json.dumps(body), {"content-type": "application/json"})
    return json.loads(c.getresponse().read())["input_tokens"]


def words_for(port, target, seed):
    """How many filler words make a prompt of about `target` tokens."""
    n = max(16, target)
    for _ in range(6):
        got = count_tokens(port, n, seed)
        if abs(got - target) <= target * 0.01:
            break
        n = max(16, int(n * target / got))
    return n


def pensieve(args, name, extra):
    port = args.port
    cmd = [args.pensieve, "--model", args.gguf, "--port", str(port), "--no-prompt-cache-persist"] + extra
    print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    env = dict(os.environ, PENSIEVE_KERNEL_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{args.out}.{name}.log", "w"))
    try:
        wait_ready(port, "/health", proc, timeout=600)
        warm = {}
        stream_one(port, "anthropic", [{"role": "user", "content": "warm up"}], 8, warm)
        res = {"decode": [], "decode8": [], "prefill": {}, "llama.cpp decode": []}
        for p in range(args.passes):
            res["decode"].append(decode(port, 1, args.tokens, p)["stream"])
            print(f"   decode: {res['decode'][-1]:.1f} tok/s", file=sys.stderr, flush=True)
            if args.alternate:
                # llama.cpp's decode in turns with ours (this server idles
                # meanwhile): the VM's speed drifts by tens of percent over minutes.
                res["llama.cpp decode"].append(llama_cpp(args, "decode", 1)["decode_tok_s"])
        for p in range(args.passes):
            d = decode(port, 8, args.tokens, p)
            res["decode8"].append(d["agg"])
            print(f"   c=8: {d['agg']:.1f} tok/s aggregate", file=sys.stderr, flush=True)
        for length in args.lengths:
            words = words_for(port, length, 1000 + length)
            rates = []
            for p in range(args.prefill_passes):
                seed = 2000 + length * 10 + p
                toks = count_tokens(port, words, seed)
                r = prefill(port, words, seed)
                rates.append(toks / r["ttft"])
                print(f"   prefill {toks} tokens: {rates[-1]:.1f} tok/s", file=sys.stderr, flush=True)
            res["prefill"][str(length)] = statistics.median(rates)
        h = health(port)
        res["rss"] = rss(proc.pid)["VmHWM"]
        res["weights_bytes"] = h["model"].get("weights_bytes")
        res["kernels"] = h["model"].get("cpu_kernels")
        res["decode"] = statistics.median(res["decode"])
        res["decode8"] = statistics.median(res["decode8"])
        return res
    finally:
        stop(proc, timeout=60)


def llama_cpp(args, only=None, passes=None):
    # ES modules resolve packages from the script's own folder: run a copy
    # beside the node_modules that holds node-llama-cpp.
    import shutil
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(os.path.dirname(args.node_path), "llama_cpp.mjs")
    shutil.copy(os.path.join(here, "llama_cpp.mjs"), script)
    cmd = ["node", script, os.path.abspath(args.gguf), str(args.threads), *map(str, args.lengths),
           "--passes", str(passes or args.passes)] + ([f"--{only}-only"] if only else [])
    print(f"== llama.cpp: {' '.join(cmd)}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"llama.cpp bench failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"   {r}", file=sys.stderr, flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--pensieve", required=True)
    ap.add_argument("--node-path", required=True, help="the node_modules folder holding node-llama-cpp")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--lengths", default="512,4096,8000")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--prefill-passes", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list: llama.cpp, pensieve, pensieve-f32")
    ap.add_argument("--f32-lengths", default="512,4096", help="prompt lengths for pensieve-f32 (slow)")
    ap.add_argument("--port", type=int, default=18600)
    ap.add_argument("--out", default="target/cpu-compare.json")
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    skip = set(args.skip.split(","))
    r = {"gguf": args.gguf, "threads": args.threads}
    args.alternate = "llama.cpp" not in skip and "pensieve" not in skip
    if "llama.cpp" not in skip:
        r["llama.cpp"] = llama_cpp(args, "prefill" if args.alternate else None)
    if "pensieve" not in skip:
        r["pensieve"] = pensieve(args, "pensieve", [])
        turns = r["pensieve"].pop("llama.cpp decode")
        if turns:
            r["llama.cpp"]["decode_tok_s"] = statistics.median(turns)
            r["llama.cpp"]["decode_turns"] = turns
    if "pensieve-f32" not in skip:
        f32 = argparse.Namespace(**{**vars(args), "lengths": [int(x) for x in args.f32_lengths.split(",") if x], "alternate": False})
        r["pensieve-f32"] = pensieve(f32, "pensieve-f32", ["--cpu-kernels", "off"])
    with open(args.out, "w") as f:
        json.dump(r, f, indent=1)
    sys.exit(report(r, args))


def report(r, args):
    cols = [k for k in ("llama.cpp", "pensieve", "pensieve-f32") if k in r]
    fmt = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "—"  # noqa: E731
    get = {
        "llama.cpp": lambda k: r["llama.cpp"]["decode_tok_s"] if k == "decode" else r["llama.cpp"]["prefill"].get(k),
    }
    print(f"\n{os.path.basename(args.gguf)}, {args.threads} threads\n")
    print("| | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    rows = [("decode, short prompt (tok/s)", "decode")]
    rows += [("aggregate decode, 8 streams (tok/s)", "decode8")]
    rows += [(f"prefill, {n} tokens (tok/s)", str(n)) for n in args.lengths]
    for label, key in rows:
        vals = []
        for c in cols:
            if c == "llama.cpp":
                vals.append(get[c](key) if key != "decode8" else None)
            elif key in ("decode", "decode8"):
                vals.append(r[c][key])
            else:
                vals.append(r[c]["prefill"].get(key))
        print(f"| {label} | " + " | ".join(fmt(v) for v in vals) + " |")
    print("| peak RSS (MiB) | " + " | ".join(fmt(r[c]["rss"] / 2**20) if "rss" in r[c] else "—" for c in cols) + " |")
    missed = []
    if "llama.cpp" in r and "pensieve" in r:
        p, l = r["pensieve"], r["llama.cpp"]
        checks = [("decode vs llama.cpp", p["decode"] / l["decode_tok_s"], 1.0)]
        for n in args.lengths:
            if str(n) in l["prefill"] and n >= 4096:
                checks.append((f"prefill {n} vs llama.cpp", p["prefill"][str(n)] / l["prefill"][str(n)], 1.0))
        checks.append(("c=8 aggregate vs own single stream", p["decode8"] / p["decode"], 2.0))
        lens = sorted(int(k) for k in p["prefill"])
        if len(lens) >= 2:
            # Cost per token grows by (rate at the shortest) / (rate at the longest).
            growth = p["prefill"][str(lens[0])] / p["prefill"][str(lens[-1])]
            print(f"\nprefill cost per token, {lens[-1]} vs {lens[0]} tokens: {growth:.2f}x (target <= 2)")
            if growth > 2:
                missed.append("prefill cost growth")
        for name, ratio, target in checks:
            ok = ratio >= target
            print(f"{name}: {ratio:.2f}x (target >= {target}) {'met' if ok else 'MISSED'}")
            if not ok:
                missed.append(name)
    return 1 if missed else 0


if __name__ == "__main__":
    main()

"""Side-by-side throughput comparison: pensieve vs mlx-lm, same model, same machine, one run.

Run through benches/compare.sh (it builds pensieve, makes the bench model and the BLAS preload
library). Systems measured:
  inproc-ref      mlx_lm.stream_generate in-process, the wheel's reference BLAS
  inproc-sgemm    the same with OpenBLAS's sgemm preloaded (every product through sgemm)
  inproc-blas     the same with the kernels pensieve uses: OpenBLAS sgemm, and sgemv for
                  one-row / one-column products (benches/blas_preload.c, as src/blas.rs routes)
  mlxserver       mlx_lm.server as installed
  mlxserver+sgemm mlx_lm.server with OpenBLAS's sgemm only
  mlxserver+blas  mlx_lm.server with the kernels pensieve uses ("same BLAS")
  pensieve        this project (its own OpenBLAS routing)
Servers get streaming clients at each concurrency; every request asks for --tokens new tokens.
Each figure is the median of its runs (waves per concurrency, follow-up conversations, in-process
runs). Ratios are given against the same-kernel baselines (the targets) and against sgemm-only
ones; the script exits 1 when a target is missed.

Also (each prints its own table): --sweep-prefill-batch 1,2,4,8 runs pensieve's c=8 waves at each
--prefill-batch; --passes times one decode pass (one token through the whole model) in-process
with every product through sgemm vs one-row products through sgemv.
"""

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "the a of to in on for with is are was were it this that weather city server request model token"
).split()


def prompt_text(seed, n_words):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def rss(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def reset_peak(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---- clients -----------------------------------------------------------------


def stream_one(port, dialect, messages, max_tokens, result):
    body = {"model": "default_model", "max_tokens": max_tokens, "temperature": 0, "stream": True, "messages": messages}
    if dialect == "anthropic":
        path = "/v1/messages"
    else:
        path = "/v1/chat/completions"
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        result.update(error=f"{resp.status} {resp.read()[:200]!r}")
        return
    t_first = t_last = None
    tokens = None
    text = []
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        piece = ""
        if dialect == "anthropic":
            if ev.get("type") == "content_block_delta":
                piece = ev["delta"].get("text", "")
            elif ev.get("type") == "message_delta":
                tokens = ev["usage"]["output_tokens"]
        else:
            for ch in ev.get("choices") or []:
                piece += (ch.get("delta") or {}).get("content") or ""
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
        if piece:
            now = time.perf_counter()
            t_first = t_first or now
            t_last = now
            text.append(piece)
    t_end = time.perf_counter()
    conn.close()
    result.update(t0=t0, ttft=(t_first or t_end) - t0, t_first=t_first, t_last=t_last, t_end=t_end,
                  tokens=tokens or 0, text="".join(text))


def wave(port, dialect, conc, max_tokens, prompt_words, seed):
    results = [dict() for _ in range(conc)]
    threads = []
    start = time.perf_counter()
    for i in range(conc):
        msgs = [{"role": "user", "content": prompt_text(seed * 1000 + i, prompt_words)}]
        t = threading.Thread(target=stream_one, args=(port, dialect, msgs, max_tokens, results[i]))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"requests failed: {errors}")
    total = sum(r["tokens"] for r in results)
    per_stream = [
        (r["tokens"] - 1) / (r["t_last"] - r["t_first"])
        for r in results
        if r["tokens"] > 1 and r["t_last"] and r["t_last"] > r["t_first"]
    ]
    return {
        "conc": conc,
        "tokens": total,
        "wall_s": wall,
        "agg_tps": total / wall,
        "stream_decode_tps_mean": statistics.mean(per_stream) if per_stream else float("nan"),
        "ttft_p50": pct([r["ttft"] for r in results], 50),
        "ttft_p95": pct([r["ttft"] for r in results], 95),
    }


def followup(port, dialect, words, max_tokens, samples=3):
    """Cold TTFT of a long first turn vs the TTFT of its follow-up turn, over `samples`
    distinct conversations (medians)."""
    cold, warm = [], []
    for i in range(samples):
        msgs = [{"role": "user", "content": prompt_text(777 + i, words)}]
        r1 = {}
        stream_one(port, dialect, msgs, max_tokens, r1)
        msgs = msgs + [{"role": "assistant", "content": r1["text"]}, {"role": "user", "content": "and then what?"}]
        r2 = {}
        stream_one(port, dialect, msgs, max_tokens, r2)
        cold.append(r1["ttft"])
        warm.append(r2["ttft"])
    ratios = [w / c for w, c in zip(warm, cold)]
    return {"cold_ttft": statistics.median(cold), "followup_ttft": statistics.median(warm),
            "ratio": statistics.median(ratios), "ratios": [round(r, 4) for r in ratios]}


def probe_latency(port, conc, paths, n=200):
    """p50/p99 of light requests while `conc` long generations run."""
    stop = threading.Event()
    bg = []

    def runner(i):
        while not stop.is_set():
            r = {}
            stream_one(port, "anthropic", [{"role": "user", "content": prompt_text(90 + i, 40)}], 256, r)

    for i in range(conc):
        t = threading.Thread(target=runner, args=(i,), daemon=True)
        t.start()
        bg.append(t)
    time.sleep(3)
    out = {}
    count_body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt_text(5, 300)}]})
    for method, path in paths:
        lat = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(n):
            t = time.perf_counter()
            if method == "GET":
                conn.request("GET", path)
            else:
                conn.request("POST", path, count_body, {"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, (path, resp.status)
            lat.append((time.perf_counter() - t) * 1000)
        conn.close()
        out[path] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    stop.set()
    for t in bg:
        t.join(timeout=120)
    return out


# ---- systems -----------------------------------------------------------------


def health(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def wait_ready(port, path, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def run_server(name, cmd, env, port, dialect, health_path, args, extra):
    print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{args.out}.{name}.log", "w"))
    try:
        wait_ready(port, health_path, proc)
        warm = {}
        stream_one(port, dialect, [{"role": "user", "content": "warm up"}], 8, warm)
        time.sleep(1)
        idle = rss(proc.pid)["VmRSS"]
        res = {"idle_rss": idle, "waves": []}
        for conc in args.conc:
            reset_peak(proc.pid)
            runs = [wave(port, dialect, conc, args.tokens, args.prompt_words, seed=conc * 10 + i)
                    for i in range(args.waves)]
            # The median wave by aggregate throughput (waves differ by a few %).
            w = sorted(runs, key=lambda x: x["agg_tps"])[len(runs) // 2]
            w["waves"] = [round(x["agg_tps"], 1) for x in runs]
            w["peak_rss"] = rss(proc.pid)["VmHWM"]
            print(f"   c={conc}: {w['agg_tps']:.1f} tok/s aggregate, TTFT p50 {w['ttft_p50']*1000:.0f} ms, "
                  f"peak RSS {w['peak_rss']/2**20:.0f} MiB", file=sys.stderr, flush=True)
            res["waves"].append(w)
            if "health" in extra:
                # The engine's own KV accounting (prefix cache + live sequences) at its
                # highest so far, read before the follow-up turns add more.
                time.sleep(1.5)  # the engine refreshes its memory snapshot about once a second
                w["kv_peak_bytes"] = health(port)["memory"].get("kv_peak_bytes")
        if "followup" in extra:
            res["followup"] = followup(port, dialect, args.followup_words, args.tokens, args.followups)
            print(f"   follow-up: {res['followup']}", file=sys.stderr, flush=True)
        if "probe" in extra:
            res["probe"] = probe_latency(port, 8, extra["probe"])
            print(f"   probes: {res['probe']}", file=sys.stderr, flush=True)
        if "health" in extra:
            res["health"] = health(port)
        return res
    finally:
        stop(proc)


def stop(proc, timeout=30):
    """SIGINT (a graceful drain), then SIGKILL after `timeout` seconds."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def inproc(model, tokens, prompt_words, runs=3):
    """Runs in a child process: mlx_lm.stream_generate on one prompt."""
    import mlx_lm

    m, tok = mlx_lm.load(model)
    tps, ptps = [], []
    for i in range(runs + 1):
        msgs = [{"role": "user", "content": prompt_text(5000 + i, prompt_words)}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
        last = None
        for r in mlx_lm.stream_generate(m, tok, prompt, max_tokens=tokens):
            last = r
        if i:  # the first run warms up
            tps.append(last.generation_tps)
            ptps.append(last.prompt_tps)
    import resource

    print(json.dumps({"decode_tps": statistics.median(tps), "prefill_tps": statistics.median(ptps),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def one_pass(model, prompt_tokens=100, runs=30):
    """Runs in a child process: the median time of one decode pass (one token through the
    whole model, after a `prompt_tokens` prefill)."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    m, _ = mlx_lm.load(model)
    cache = make_prompt_cache(m)
    mx.eval(m(mx.array([[5] * prompt_tokens]), cache=cache))
    times = []
    for i in range(runs + 3):
        t = time.perf_counter()
        mx.eval(m(mx.array([[7]]), cache=cache))
        if i >= 3:
            times.append(time.perf_counter() - t)
        for c in cache:
            c.trim(1)
    print(json.dumps({"pass_ms": statistics.median(times) * 1000}))


def passes(args, base_env, blas_env):
    py = sys.executable
    out = {}
    for name, env in (("reference BLAS", base_env), ("OpenBLAS sgemm only", dict(blas_env, BLAS_PRELOAD_GEMV="0")),
                      ("OpenBLAS, one-row products through sgemv", blas_env)):
        r = subprocess.run([py, __file__, "--pass", args.model], env=env, capture_output=True, text=True, check=True)
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])["pass_ms"]
    print(f"\none decode pass (1 token, 100 cached), {args.model}, median of 30:\n")
    print("| BLAS | ms per pass |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v:.1f} |")
    return out


def sweep(args, base_env, port):
    """pensieve's c=8 waves at each --prefill-batch."""
    out = []
    for pb in args.sweep_prefill_batch:
        pcmd = [args.pensieve, "--model", args.model, "--port", str(port), "--max-concurrent", "8",
                "--no-prompt-cache-persist", "--prefill-batch", str(pb)] + args.pensieve_args.split()
        sargs = argparse.Namespace(**{**vars(args), "conc": [8]})
        r = run_server(f"pensieve-pb{pb}", pcmd, dict(base_env, RUST_LOG="warn"), port, "anthropic", "/health", sargs, {})
        w = r["waves"][0]
        out.append({"prefill_batch": pb, "agg_tps": w["agg_tps"], "ttft_p50": w["ttft_p50"], "waves": w["waves"]})
    print(f"\n--prefill-batch sweep, c=8 x {args.tokens} tokens, ~{args.prompt_words}-word prompts "
          f"(median of {args.waves} waves):\n")
    print("| --prefill-batch | aggregate tok/s | TTFT p50 ms |\n|---|---|---|")
    for x in out:
        print(f"| {x['prefill_batch']} | {x['agg_tps']:.1f} | {x['ttft_p50'] * 1000:.0f} |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pensieve", required=True)
    ap.add_argument("--preload", required=True, help="shared library exporting cblas_sgemm -> OpenBLAS")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--followup-words", type=int, default=1500)
    ap.add_argument("--conc", default="1,4,8")
    ap.add_argument("--skip", default="", help="comma list of systems to skip")
    ap.add_argument("--waves", type=int, default=3, help="waves per concurrency (median reported); slow systems get 1")
    ap.add_argument("--followups", type=int, default=3, help="follow-up conversations (median reported)")
    ap.add_argument("--sweep-prefill-batch", default="", help="e.g. 1,2,4,8: only this sweep (pensieve, c=8)")
    ap.add_argument("--passes", action="store_true", help="only the one-pass timings")
    ap.add_argument("--pensieve-args", default="", help="extra flags for pensieve")
    ap.add_argument("--out", default="target/compare.json")
    ap.add_argument("--resume", action="store_true",
                    help="keep the systems already measured in --out (same model and settings) and run the rest")
    args = ap.parse_args()
    args.conc = [int(c) for c in args.conc.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    base_env = dict(os.environ)
    blas_env = dict(base_env, LD_PRELOAD=args.preload)
    results = {"model": args.model, "tokens": args.tokens, "prompt_words": args.prompt_words}
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        if all(old.get(k) == results[k] for k in results):
            results = old
            skip |= {k for k in old if k not in ("model", "tokens", "prompt_words")}
            print(f"== resuming: {sorted(skip)} already measured", file=sys.stderr, flush=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    port = 18000 + os.getpid() % 1000
    if args.passes:
        passes(args, base_env, blas_env)
        return 0
    if args.sweep_prefill_batch:
        args.sweep_prefill_batch = [int(x) for x in args.sweep_prefill_batch.split(",")]
        sweep(args, base_env, port)
        return 0
    sgemm_env = dict(blas_env, BLAS_PRELOAD_GEMV="0")

    for name, env in (("inproc-ref", base_env), ("inproc-sgemm", sgemm_env), ("inproc-blas", blas_env)):
        if name in skip:
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        out = subprocess.run([py, __file__, "--inproc", args.model, str(args.tokens), str(args.prompt_words)],
                             env=env, capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"   {results[name]}", file=sys.stderr, flush=True)
        save()

    mlx_cmd = [py, "-m", "mlx_lm", "server", "--model", args.model, "--port", str(port), "--log-level", "WARNING"]
    if "mlxserver" not in skip:
        # The reference-BLAS server is ~10x slower: one wave per concurrency.
        slow = argparse.Namespace(**{**vars(args), "waves": 1})
        results["mlxserver"] = run_server("mlxserver", mlx_cmd, base_env, port, "openai", "/health", slow, {})
        save()
    if "mlxserver+sgemm" not in skip:
        # Only for the with/without-sgemv ratio: one wave per concurrency.
        slow = argparse.Namespace(**{**vars(args), "waves": 1})
        results["mlxserver+sgemm"] = run_server("mlxserver+sgemm", mlx_cmd, sgemm_env, port, "openai", "/health", slow, {})
        save()
    if "mlxserver+blas" not in skip:
        results["mlxserver+blas"] = run_server("mlxserver+blas", mlx_cmd, blas_env, port,
                                               "openai", "/health", args, {"followup": True})
        save()
    # No prefix cache from disk: the cold turns must be cold.
    pcmd = [args.pensieve, "--model", args.model, "--port", str(port), "--max-concurrent", "8",
            "--no-prompt-cache-persist"] + args.pensieve_args.split()
    if "pensieve" not in skip:
        results["pensieve"] = run_server(
            "pensieve", pcmd, dict(base_env, RUST_LOG="warn"), port, "anthropic", "/health", args,
            {"followup": True, "probe": [("GET", "/health"), ("POST", "/v1/messages/count_tokens")], "health": True},
        )
    save()
    missed = report(results)
    if missed:
        print(f"\nMISSED {len(missed)} target(s): " + "; ".join(missed))
        return 1
    return 0


def report(r):
    def w(sys_, conc):
        for x in r.get(sys_, {}).get("waves", []):
            if x["conc"] == conc:
                return x
        return None

    print(f"\nmodel {r['model']}, {r['tokens']} new tokens per request, ~{r['prompt_words']}-word prompts\n")
    print("| system | c | aggregate tok/s | per-stream decode tok/s | TTFT p50 ms | TTFT p95 ms | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for s in ("mlxserver", "mlxserver+sgemm", "mlxserver+blas", "pensieve"):
        for x in r.get(s, {}).get("waves", []):
            print(f"| {s} | {x['conc']} | {x['agg_tps']:.1f} | {x['stream_decode_tps_mean']:.1f} | "
                  f"{x['ttft_p50']*1000:.0f} | {x['ttft_p95']*1000:.0f} | {x['peak_rss']/2**20:.0f} |")
    for s in ("inproc-ref", "inproc-sgemm", "inproc-blas"):
        if s in r:
            print(f"| {s} (mlx_lm.stream_generate) | 1 | - | {r[s]['decode_tps']:.1f} | - | - | {r[s]['peak_rss']/2**20:.0f} |")
    print("\nratios (target in brackets; 'same kernels': the baseline with pensieve's BLAS routing)")
    missed = []

    def ratio(label, value, target, ok, extra=""):
        hit = ok(value)
        print(f"- {label}: {value:.3f}{extra} [{target}]{'' if hit else '  MISSED'}")
        if not hit:
            missed.append(f"{label} {value:.3f} (target {target})")

    p1, p8 = w("pensieve", 1), w("pensieve", 8)
    b8, s8, m8 = w("mlxserver+blas", 8), w("mlxserver+sgemm", 8), w("mlxserver", 8)
    if p1 and "inproc-blas" in r:
        ratio("single-stream decode vs in-process mlx_lm, same kernels",
              p1["stream_decode_tps_mean"] / r["inproc-blas"]["decode_tps"], ">= 0.97", lambda v: v >= 0.97)
        if "inproc-sgemm" in r:
            print(f"  (vs in-process mlx_lm with sgemm only: {p1['stream_decode_tps_mean'] / r['inproc-sgemm']['decode_tps']:.2f})")
    if p8 and b8:
        ratio("aggregate c=8 vs mlx_lm.server, same kernels", p8["agg_tps"] / b8["agg_tps"], ">= 1.0", lambda v: v >= 1.0)
        if s8:
            print(f"  (vs mlx_lm.server with sgemm only: {p8['agg_tps'] / s8['agg_tps']:.2f})")
        ratio("TTFT p50 c=8 vs mlx_lm.server, same kernels", p8["ttft_p50"] / b8["ttft_p50"], "<= 0.7", lambda v: v <= 0.7)
        if s8:
            print(f"  (vs mlx_lm.server with sgemm only: {p8['ttft_p50'] / s8['ttft_p50']:.2f})")
    if p8 and m8:
        ratio("aggregate c=8 vs mlx_lm.server as installed", p8["agg_tps"] / m8["agg_tps"], ">= 5", lambda v: v >= 5)
    p = r.get("pensieve", {})
    if p8 and p8.get("kv_peak_bytes") is not None:
        kv = p8["kv_peak_bytes"]
        budget = p["idle_rss"] + kv
        ratio("peak RSS c=8 / (idle RSS + KV held at once)", p8["peak_rss"] / budget, "<= 1.10", lambda v: v <= 1.10,
              f" ({p8['peak_rss']/2**20:.0f} MiB vs idle {p['idle_rss']/2**20:.0f} + KV {kv/2**20:.0f} MiB)")
    if "followup" in p:
        f = p["followup"]
        ratio("follow-up TTFT / cold TTFT (prefix cache)", f["ratio"], "<= 0.2", lambda v: v <= 0.2,
              f" ({f['followup_ttft']*1000:.0f} ms vs {f['cold_ttft']*1000:.0f} ms, median of {len(f.get('ratios', [1]))}: {f.get('ratios')})")
    if "followup" in r.get("mlxserver+blas", {}):
        f = r["mlxserver+blas"]["followup"]
        print(f"  (mlx_lm.server same kernels: {f['ratio']:.3f}, {f['followup_ttft']*1000:.0f} ms vs {f['cold_ttft']*1000:.0f} ms)")
    for path, v in p.get("probe", {}).items():
        ratio(f"{path} p99 ms while 8 generate", v["p99_ms"], "<= 5", lambda x: x <= 5.0, f" (p50 {v['p50_ms']:.2f})")
    return missed


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--inproc":
        inproc(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--pass":
        one_pass(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--report":
        sys.exit(1 if report(json.load(open(sys.argv[2]))) else 0)
    else:
        sys.exit(main())

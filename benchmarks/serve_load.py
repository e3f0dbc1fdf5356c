"""Load on `kiln serve` over loopback: throughput and latency against concurrency.

    python benchmarks/serve_load.py ARTIFACT [--concurrency 1,2,4,8] [--input 128] [--output 128]
        [--requests-per-level 16] [--max-batch 8] [--threads 2] [--device cpu] [--random-weights]
        [--shared-prefix N --prefix-cache SLOTS]   (prompts that start alike, with and without the cache)
        [--json-out FILE] [--plot FILE.png]

Starts the server (`python -m kiln.cli serve`, --max-batch = the largest
concurrency unless given), then for each concurrency C keeps C streaming
requests in flight (closed loop) until --requests-per-level have finished.
Prompts are random token ids of --input tokens (a different prompt per
request, the same prompts at every level), --output tokens each (EOS
ignored). Per request: TTFT (send to first token), inter-token latency (gaps
between streamed tokens). Per level: output tok/s (all tokens / wall time),
requests/s, TTFT and ITL p50/p99 (the server streams a chunk per token). The
single-stream line is concurrency 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def one_request(host, port, model, prompt, n_out, timeout=600):
    """Stream one completion; returns (ttft s, [inter-token gaps s], tokens, total s)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": n_out, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    stamps, usage = [], None
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if obj.get("usage"):
            usage = obj["usage"]
        if obj.get("choices") and obj["choices"][0].get("finish_reason") is None:
            stamps.append(time.perf_counter())  # a chunk per token (its text may be "": no tokenizer, held back)
    conn.close()
    total = time.perf_counter() - t0
    toks = usage["completion_tokens"] if usage else len(stamps)
    gaps = list(np.diff(stamps)) if len(stamps) > 1 else []
    return (stamps[0] - t0) if stamps else total, gaps, toks, total


def _client_proc(host, port, model, prompts, n_out, threads, counter, n_requests, start, out):
    """One load-generator process: `threads` closed-loop streams, requests taken from a shared counter."""
    lock = threading.Lock()
    results = []

    def worker():
        while True:
            with counter.get_lock():
                i = counter.value
                if i >= n_requests:
                    return
                counter.value = i + 1
            r = one_request(host, port, model, prompts[i % len(prompts)], n_out)
            with lock:
                results.append(r)

    start.wait()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(results)


def run_level(host, port, model, prompts, n_out, concurrency, n_requests, procs=1):
    """Closed loop: `concurrency` streams, spread over `procs` client processes (one Python
    process parsing 12,000+ SSE events a second would limit what it measures)."""
    import multiprocessing as mp  # noqa: PLC0415

    ctx = mp.get_context("fork")
    procs = max(1, min(procs, concurrency))
    counter, start, out = ctx.Value("q", 0), ctx.Event(), ctx.Queue()
    shares = [concurrency // procs + (k < concurrency % procs) for k in range(procs)]
    ps = [ctx.Process(target=_client_proc, args=(host, port, model, prompts, n_out, n, counter, n_requests, start, out)) for n in shares]
    for p in ps:
        p.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    start.set()
    results = [r for _ in ps for r in out.get()]
    for p in ps:
        p.join()
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    itl = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "output_tok_s": tokens / wall,
            "req_s": len(results) / wall, "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
            "per_stream_tok_s": statistics.median(r[2] / max(r[3] - r[0], 1e-9) for r in results)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--requests-per-level", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--shared-prefix", type=int, default=0, help="the first N of the --input tokens are the same in every prompt (a system prompt)")
    ap.add_argument("--prefix-cache", type=int, default=0, help="kiln serve --prefix-cache N")
    ap.add_argument("--client-procs", type=int, default=None, help="load-generator processes (default: one per 16 streams)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--plot", default=None, help="PNG of output tok/s against concurrency (needs matplotlib)")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    max_batch = a.max_batch or max(levels)
    cmd = [sys.executable, "-m", "kiln.cli", "serve", a.artifact, "--port", "0", "--model-name", "m", "--max-batch", str(max_batch),
           "--threads", str(a.threads), "--device", a.device, "--max-queue", "4096"]
    if a.random_weights:
        cmd.append("--random-weights")
    if a.max_seq_len:
        cmd += ["--max-seq-len", str(a.max_seq_len)]
    if a.prefix_cache:
        cmd += ["--prefix-cache", str(a.prefix_cache)]
    if not 0 <= a.shared_prefix < a.input:
        raise SystemExit("--shared-prefix must be in [0, --input)")
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline()
        m = re.search(r"http://([\d.]+):(\d+)", line)
        if not m:
            raise SystemExit(f"server did not start: {line!r}")
        host, port = m.group(1), int(m.group(2))
        vocab = 100
        for _ in range(600):  # the model loads after the socket is bound
            try:
                c = http.client.HTTPConnection(host, port, timeout=60)
                c.request("GET", "/v1/models")
                ctx = json.loads(c.getresponse().read())["data"][0]["max_model_len"]
                c.close()
                break
            except OSError:
                time.sleep(0.1)
        if a.input + a.output > ctx:
            raise SystemExit(f"--input + --output = {a.input + a.output} is over the served context {ctx} (--max-seq-len)")
        rng = np.random.default_rng(0)
        shared = rng.integers(3, vocab, a.shared_prefix).tolist()
        prompts = [shared + rng.integers(3, vocab, a.input - a.shared_prefix).tolist() for _ in range(max(64, a.requests_per_level))]
        one_request(host, port, "m", prompts[0], 8)  # warm-up
        rows = []
        for c in levels:
            r = run_level(host, port, "m", prompts, a.output, c, max(a.requests_per_level, c), a.client_procs or -(-c // 16))
            rows.append(r)
            print(f"  concurrency {c}: {r['output_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        srv.terminate()
        srv.wait(timeout=60)
    base = rows[0]["output_tok_s"]
    extra = f", {a.shared_prefix} shared prompt tokens, --prefix-cache {a.prefix_cache}" if a.shared_prefix or a.prefix_cache else ""
    print(f"\nkiln serve {a.artifact}: {a.input}/{a.output} tokens, max batch {max_batch}, {a.threads} threads, device {a.device}{extra}\n")
    print("| concurrency | output tok/s | x concurrency 1 | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | per-stream tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['output_tok_s']:.1f} | {r['output_tok_s'] / base:.2f} | {r['req_s']:.2f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['per_stream_tok_s']:.1f} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"args": vars(a), "levels": rows}, indent=1))
    if a.plot:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["concurrency"] for r in rows], [r["output_tok_s"] for r in rows], "o-", label="kiln serve")
        ax.plot([r["concurrency"] for r in rows], [base * r["concurrency"] for r in rows], ":", color="gray", label="linear")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tok/s")
        ax.set_title(f"{Path(a.artifact).name}, {a.input}/{a.output}, {a.device}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())

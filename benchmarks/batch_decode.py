"""Decode-step throughput against batch size, on the Session (runtime only, so it
runs from a `kiln bundle` on the GPU machine).

    python benchmarks/batch_decode.py ART [--device cuda] [--random-weights] [--batches 1,2,4,8,16,32,64,128]
        [--context 128] [--steps 32] [--threads N] [--json-out FILE]

For each B: B sequences, each advanced to --context cached tokens without a
prefill (Session.advance: the KV pages hold whatever they held; the speed of
attention over them is the same), then --steps greedy decode steps over all B
in one call per step (decode_batch where the artifact has it; per-sequence
calls otherwise). Prints ms/step, aggregate tok/s and the ratio to B=1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    from kiln.runtime import load  # noqa: PLC0415

    batches = [int(x) for x in a.batches.split(",")]
    s = load(a.artifact, device=a.device, random_weights=a.random_weights, threads=a.threads, max_sequences=max(batches),
             max_seq_len=a.context + a.steps + 8)
    print(f"{a.artifact}: device {a.device}, decode_batch {'yes' if s._decode_batch is not None else 'no'}, "
          f"context {a.context}, {a.steps} steps", flush=True)
    rows, base = [], None
    for b in batches:
        seqs = [s.add_sequence() for _ in range(b)]
        for q in seqs:
            s.advance(q, a.context)
        toks = [1] * b
        toks = s.decode_greedy(seqs, toks)  # warm-up (and CUDA graph capture for this shape)
        s.sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            toks = s.decode_greedy(seqs, toks)
        s.sync()
        dt = (time.perf_counter() - t0) / a.steps
        for q in seqs:
            s.remove_sequence(q)
        tps = b / dt
        base = base or tps
        rows.append({"batch": b, "ms_per_step": 1e3 * dt, "tok_s": tps, "x_b1": tps / base})
        print(f"B={b:4d}: {1e3 * dt:8.2f} ms/step  {tps:9.1f} tok/s  x{tps / base:.2f}", flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

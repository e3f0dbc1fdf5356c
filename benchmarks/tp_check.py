"""Tensor parallel on GPUs (issue 16), one device call: an artifact split over N
GPUs against the same model unsplit, and the collective's latency.

    python benchmarks/tp_check.py --pair TP1.kiln TP2.kiln [--pair ...] [--allreduce-bytes 8192,16384]

For each pair: max |logits_TPn - logits_TP1| / max |logits_TP1| over a teacher-
forced prompt (prefill) and over decode steps, and whether 32 greedy tokens are
equal. Then the latency of one kiln.ccl.allreduce of a decode step's hidden
state (bf16, the sizes given), timed eagerly (no CUDA graph) on every rank.
Prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def check_pair(one_path: str, split_path: str, device: str) -> dict:
    from kiln.runtime import load  # noqa: PLC0415

    one = load(one_path, device=device)
    split = load(split_path, device=device)
    try:
        vocab = one.vocab_size
        ids = [int(i) for i in np.random.default_rng(0).integers(0, vocab, 40)]
        prefill = rel(split.logits(ids), one.logits(ids))
        decode = rel(split.decode_logits(ids[:12]), one.decode_logits(ids[:12]))
        a = one.generate(ids[:8], max_new_tokens=32, ignore_eos=True).tokens
        b = split.generate(ids[:8], max_new_tokens=32, ignore_eos=True).tokens
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        return {"check": "logits", "tp1": one_path, "split": split_path, "shards": split.shards, "prefill_rel": prefill,
                "decode_rel": decode, "greedy_equal": a == b, "first_diff": first_diff, "distinct_tokens": len(set(a))}
    finally:
        split.close()


def allreduce_latency(split_path: str, sizes: list[int], device: str) -> list[dict]:
    """Per-call latency of kiln.ccl.allreduce on the workers of a loaded split session."""
    from kiln.runtime import load  # noqa: PLC0415

    split = load(split_path, device=device, random_weights=True)
    out = []
    try:
        for nbytes in sizes:
            us = split.allreduce_latency(nbytes)
            out.append({"check": "allreduce", "bytes": nbytes, "dtype": "bfloat16", "us_per_call_rank0": us, "shards": split.shards})
    finally:
        split.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("TP1", "SPLIT"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--allreduce", default=None, help="a split artifact (random weights allowed) to time the collective on")
    ap.add_argument("--allreduce-bytes", default="8192,16384")
    ap.add_argument("--watchdog", type=float, default=0, help="dump every thread's stack after this many seconds (debugging a hang)")
    a = ap.parse_args()
    if a.watchdog:
        import faulthandler  # noqa: PLC0415
        import sys  # noqa: PLC0415

        faulthandler.dump_traceback_later(a.watchdog, exit=True, file=sys.stderr)
    for one, split in a.pair:
        t = time.perf_counter()
        res = check_pair(one, split, a.device)
        res["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(res), flush=True)
    if a.allreduce:
        for res in allreduce_latency(a.allreduce, [int(x) for x in a.allreduce_bytes.split(",")], a.device):
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

"""Where does one decode step (or one prefill) go? Times every call the Relax VM
makes, in situ (real weights from DRAM, real KV cache), via the VM's
instrument hook. Kernel names are the compiled TIR functions' names.

    python benchmarks/profile_step.py ART.kiln [--mode decode|prefill] [--context 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from kiln.runtime import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--mode", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    s = load(a.artifact, threads=a.threads, verify=False)
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(func, name, before, ret, *args):
        if before:
            started[name] = time.perf_counter()
        else:
            totals[name] += time.perf_counter() - started.pop(name, time.perf_counter())
            counts[name] += 1
        return 0

    ids = [(i * 7919) % s.vocab_size for i in range(a.context)]
    s.kv.add(0)
    s._forward_prefill(ids, np.array([len(ids) - 1]))
    s.vm.set_instrument(instrument)
    t0 = time.perf_counter()
    if a.mode == "decode":
        for _ in range(a.steps):
            s._forward_decode(5)
    else:
        for _ in range(a.steps):
            s.kv.remove(0)
            s.kv.add(0)
            s._forward_prefill(ids, np.array([len(ids) - 1]))
    wall = (time.perf_counter() - t0) / a.steps
    s.vm.set_instrument(None) if False else None
    inside = sum(totals.values()) / a.steps
    print(f"{a.mode}: {wall * 1e3:.2f} ms per step (instrumented), {inside * 1e3:.2f} ms inside VM calls")
    for name, tot in sorted(totals.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {tot / a.steps * 1e3:8.3f} ms  {counts[name] // a.steps:4d} calls/step  {name}")


if __name__ == "__main__":
    main()

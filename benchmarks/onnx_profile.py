"""Where a graph artifact's time goes, per kernel (the Relax VM's instrument hook).

    python benchmarks/onnx_profile.py ART.kiln [--threads 2] [--runs 10] [--top 25]

Runs the graph on random inputs (runtime.graph.random_inputs), sums the wall time of every
call the VM makes by callee name, and prints ms per run, calls per run and the share.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    from kiln.runtime import load  # noqa: PLC0415
    from kiln.runtime.graph import random_inputs  # noqa: PLC0415

    m = load(a.artifact, threads=a.threads)
    feeds, _ = random_inputs(m.inputs, {})
    for _ in range(3):
        m.run(feeds)
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

    m._vm.set_instrument(instrument)
    t0 = time.perf_counter()
    for _ in range(a.runs):
        m.run(feeds)
    wall = (time.perf_counter() - t0) / a.runs
    inside = sum(totals.values()) / a.runs
    print(f"{a.artifact}: {wall * 1e3:.2f} ms per run (instrumented), {inside * 1e3:.2f} ms inside VM calls")
    for name, tot in sorted(totals.items(), key=lambda kv: -kv[1])[:a.top]:
        ms = tot / a.runs * 1e3
        print(f"  {ms:8.3f} ms {100 * ms / (inside * 1e3):5.1f}%  {counts[name] // a.runs:4d} calls  {ms / max(counts[name] // a.runs, 1):7.3f} ms/call  {name}")


if __name__ == "__main__":
    main()

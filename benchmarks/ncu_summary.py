"""Per-kernel totals of an Nsight Compute CSV (from profile_step.py --ncu-range):

    python benchmarks/ncu_summary.py results/gpu_ncu_l8b_decode_....csv

Prints, per kernel name: total ms, calls, us per call, DRAM read GB/s (when
dram__bytes_read.sum was collected), grid and block size.
"""

from __future__ import annotations

import collections
import csv
import sys


def main(path: str) -> None:
    rows = list(csv.DictReader([line for line in open(path) if line.startswith('"')]))
    kernels: dict = collections.OrderedDict()
    for r in rows:
        kernels.setdefault((r["ID"], r["Kernel Name"]), {})[r["Metric Name"]] = r["Metric Value"].replace(",", "")
    agg: dict = collections.defaultdict(lambda: [0, 0.0, 0.0, ("", "")])
    for (_, name), m in kernels.items():
        a = agg[name]
        a[0] += 1
        a[1] += float(m["gpu__time_duration.sum"])  # ns
        a[2] += float(m.get("dram__bytes_read.sum", 0) or 0)
        a[3] = (m.get("launch__grid_size", ""), m.get("launch__block_size", ""))
    total = sum(a[1] for a in agg.values())
    print(f"total {total / 1e6:.3f} ms over {len(kernels)} kernels")
    for name, (n, ns, rd, (grid, block)) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        bw = f"{rd / ns:6.0f} GB/s" if rd else "       -   "
        print(f"{ns / 1e6:8.3f} ms {n:4d}x {ns / n / 1e3:9.2f} us  {bw}  grid {grid:>6s} block {block:>5s}  {name[:70]}")


if __name__ == "__main__":
    main(sys.argv[1])

"""CPU decode GEMV schedule variants, built here for several CPU levels and
timed on any host (runtime-only TVM: e.g. an AVX-512 machine that only has a
`kiln bundle`).

    python benchmarks/cpu_gemv_variants.py build OUTDIR [--cpus x86-64-v3,x86-64-v4]    # needs the TVM compiler
    python benchmarks/cpu_gemv_variants.py time OUTDIR [--threads 2]                     # runtime only

Variants: CpuGemv(accumulators=a, max_lanes=l, tree=t): a vector accumulators
of l lanes per row; the rfactor write-back then sums a*l partials per row
serially, or (tree) by halving vector adds down to 2.
Shapes: SmolLM2's gate_up (3072x576), down (576x1536), lm_head (49152x576),
fp32 and fp16 weights. Each timing cycles through 8 weight copies (> L2) and
reports the best of 7 passes as GB/s of weights read.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

SHAPES = [(3072, 576), (576, 1536), (49152, 576)]
VARIANTS = [(4, None, False), (2, None, False), (1, None, False), (2, None, True), (4, None, True)]  # (accumulators, max_lanes, tree)


def build(out: Path, cpus: list[str]) -> None:
    from kiln.compiler.target import parse_target  # noqa: PLC0415
    from kiln.passes.cpu_rules import CpuGemv, reduction_tile, vector_lanes  # noqa: PLC0415
    from kiln.tvm_compat import compiler  # noqa: PLC0415

    t = compiler()
    tvm, te = t.tvm, t.te
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for cpu in cpus:
        tg = parse_target("llvm:" + cpu)[0]
        tt = tg.tvm_target()
        for wdt in ("float32", "float16"):
            for n, k in SHAPES:
                for acc, cap, tree in VARIANTS:
                    x = te.placeholder((1, 1, k), "float32", name="x")
                    w = te.placeholder((n, k), wdt, name="w")
                    r = te.reduce_axis((0, k), name="r")
                    y = te.compute((1, 1, n), lambda b, i, j: te.sum(x[b, i, r] * w[j, r].astype("float32"), axis=r), name="NT_matmul")
                    sch = CpuGemv(accumulators=acc, max_lanes=cap, tree=tree).apply(te.create_prim_func([x, w, y]), tt)
                    lanes = min(vector_lanes(tt), cap or 64)
                    vec, a = reduction_tile(k, lanes, acc)
                    name = f"{cpu}_{wdt}_{n}x{k}_a{a}_l{vec}" + ("_tree" if tree else "")
                    if any(e["name"] == name for e in index):
                        continue
                    mod = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=tt)
                    mod.export_library(str(out / f"{name}.so"))
                    index.append({"name": name, "cpu": cpu, "flags": tg.required_cpu_flags(), "n": n, "k": k, "dtype": wdt, "acc": a, "lanes": vec, "tree": tree})
    (out / "index.json").write_text(json.dumps(index, indent=1))


def time_all(out: Path, threads: int) -> None:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    from kiln.runtime.hostinfo import host_cpu_flags  # noqa: PLC0415
    from kiln.tvm_compat import runtime  # noqa: PLC0415

    rt = runtime()
    tvm = rt.tvm
    have = host_cpu_flags()
    dev = tvm.cpu()
    rows = []
    for e in json.loads((out / "index.json").read_text()):
        if not set(e["flags"]) <= have:
            continue
        fn = tvm.runtime.load_module(str(out / f"{e['name']}.so"))["main"]
        rng = np.random.default_rng(0)
        ws = [tvm.runtime.tensor(rng.standard_normal((e["n"], e["k"])).astype(e["dtype"]), dev) for _ in range(8)]
        x = tvm.runtime.tensor(rng.standard_normal((1, 1, e["k"])).astype("float32"), dev)
        y = tvm.runtime.empty((1, 1, e["n"]), "float32", dev)
        for w in ws:
            fn(x, w, y)
        best = 1e9
        for _ in range(7):
            t0 = time.perf_counter()
            for w in ws:
                fn(x, w, y)
            best = min(best, (time.perf_counter() - t0) / len(ws))
        gbs = e["n"] * e["k"] * np.dtype(e["dtype"]).itemsize / best / 1e9
        rows.append({**e, "us": best * 1e6, "GB_s": gbs})
        print(f"{e['cpu']:16s} {e['dtype']:8s} {e['n']:6d}x{e['k']:<5d} acc {e['acc']} lanes {e['lanes']:2d}{' tree' if e.get('tree') else '     '}: "
              f"{best * 1e6:9.1f} us {gbs:7.1f} GB/s", flush=True)
    (out / f"times_t{threads}.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["build", "time"])
    ap.add_argument("out")
    ap.add_argument("--cpus", default="x86-64-v3,x86-64-v4")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    build(Path(a.out), a.cpus.split(",")) if a.cmd == "build" else time_all(Path(a.out), a.threads)


if __name__ == "__main__":
    main()

"""MoE expert GEMVs on CPU, one decoded token, per weight format: kiln's
expert_matmul (gate/up) and expert_down (frontends/models/moe.py) scheduled by
CpuExpertGemv, on a layer of Qwen3-30B-A3B by default (E=128 experts, top-8,
hidden 2048, expert width 768). Random codes stand in for weights (never written
NaN codes avoided); every call routes to 8 fresh random experts (cold rows, as
decode sees them). Reports the median of --calls calls as ms and GB/s of the
bytes the chosen experts' rows hold (codes, scales, minimums).

    python benchmarks/moe_expert_gemv.py [--formats float32,float16,q8,q4g32,q4g128,fp8] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def random_stack(fmt, shape, rng):
    """Random arrays of a [E, N, K] stack in `fmt` (a WeightFormat, or a float dtype name)."""
    if isinstance(fmt, str):
        return [rng.standard_normal(shape, dtype=np.float32).astype(fmt)]
    out = []
    for sfx, (shp, dt) in fmt.stacked_parts(shape).items():
        if sfx == "q":
            a = rng.integers(0, 256 if dt != "uint32" else 2**32, size=shp, dtype=np.uint64).astype(dt)
            if fmt.invalid_codes:
                a[np.isin(a, fmt.invalid_codes)] = 0
        else:
            a = (0.01 * rng.random(shp)).astype(dt)
        out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="float32,float16,q8,q4g32,q4g128,fp8")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--calls", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))

    from kiln.compiler.target import parse_target  # noqa: PLC0415
    from kiln.passes.cpu_rules import CpuExpertGemv  # noqa: PLC0415
    from kiln.passes.quant import WEIGHT_FORMATS  # noqa: PLC0415
    from kiln.tvm_compat import compiler  # noqa: PLC0415

    t = compiler()
    tvm, te = t.tvm, t.te
    from kiln.frontends.models import moe  # noqa: PLC0415

    target = parse_target("llvm")[0].tvm_target()
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    e, k, d, f = a.experts, a.top_k, a.hidden, a.ffn
    print(f"E={e} top-{k} hidden={d} ffn={f}, 1 token, median of {a.calls} calls, {a.threads} threads")
    print(f"| weights | gate_up [{k} x {2 * f} x {d}] | down [{d} x {k} x {f}] |\n|---|---|---|")
    for name in a.formats.split(","):
        fmt = None if name in ("float32", "float16") else WEIGHT_FORMATS[name]
        cells = []
        for kind, (n, kdim) in (("gate_up", (2 * f, d)), ("down", (d, f))):
            ids = te.placeholder((1, k), "int32", name="ids")
            if fmt is None:
                w = (te.placeholder((e, n, kdim), name, name="w"),)
            else:
                w = tuple(te.placeholder(s, dt, name=f"w_{x}") for x, (s, dt) in fmt.stacked_parts((e, n, kdim)).items())
            if kind == "gate_up":
                x = te.placeholder((1, kdim), "float32", name="x")
                y = moe.te_expert_matmul(x, w if fmt else w[0], ids, fmt=fmt)
                args = [x, *w, ids, y]
                inputs = [rng.standard_normal((1, kdim), dtype=np.float32)]
            else:
                x = te.placeholder((1, k, kdim), "float32", name="a")
                wts = te.placeholder((1, k), "float32", name="wts")
                y = moe.te_expert_down(x, w if fmt else w[0], ids, wts, fmt=fmt)
                args = [x, *w, ids, wts, y]
                inputs = [rng.standard_normal((1, k, kdim), dtype=np.float32)]
            func = te.create_prim_func(args).with_attr("global_symbol", "main")
            lib = tvm.compile(CpuExpertGemv().apply(func, target).mod, target=target)
            stack = [tvm.runtime.tensor(p, dev) for p in random_stack(fmt or name, (e, n, kdim), rng)]
            per_expert = sum(p.numpy().nbytes for p in stack) / e
            out = tvm.runtime.empty(tuple(int(s) for s in y.shape), "float32", dev)
            xs = [tvm.runtime.tensor(v, dev) for v in inputs]
            extra = [tvm.runtime.tensor(np.full((1, k), 1.0 / k, np.float32), dev)] if kind == "down" else []
            times = []
            for _ in range(a.calls):
                chosen = tvm.runtime.tensor(rng.permutation(e)[:k].astype(np.int32)[None, :], dev)
                t0 = time.perf_counter()
                lib["main"](*xs, *stack, chosen, *extra, out)
                times.append(time.perf_counter() - t0)
            ms = float(np.median(times)) * 1e3
            cells.append(f"{ms:.2f} ms, {per_expert * k / ms / 1e6:.1f} GB/s")
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()

"""Time every scheduled TIR kernel of a model alone: where does a token's time go?

    python benchmarks/kernel_times.py MODEL [--target llvm] [--vars seq_len=128,batch_size=1] [--filter NT_matmul]

Builds the model IR through kiln's pass pipeline, then compiles each PrimFunc on
its own and times it on random inputs (symbolic dims bound by --vars). Prints
ms per call and GB/s counting every buffer's bytes once (a lower bound on traffic).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kiln.compiler.target import parse_target
from kiln.frontends.readers import open_checkpoint
from kiln.frontends.config import ModelConfig
from kiln.frontends.models import family_for
from kiln.passes.pipeline import PipelineOptions, run_pipeline
from kiln.tvm_compat import compiler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vars", default="seq_len=128,batch_size=1,num_logits=1")
    ap.add_argument("--filter", default="")
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    t = compiler()
    tvm = t.tvm
    binds = {k: int(v) for k, v in (kv.split("=") for kv in a.vars.split(","))}
    ck = open_checkpoint(a.model)
    cfg = ModelConfig.from_dict(ck.config)
    fam = family_for(cfg.architecture)
    cfg = fam.adapt_config(cfg)
    tg = parse_target(a.target)[0]
    target = tg.tvm_target()
    with target:
        lm = fam(cfg, a.dtype)
        mod, _, _ = lm.export_tvm(spec=lm.export_spec(), allow_extern=True)
    mod = run_pipeline(mod, PipelineOptions(target=target))
    dev = tvm.cpu()
    rows = []
    for gv, func in mod.functions_items():
        if not isinstance(func, t.tirx.PrimFunc) or a.filter not in gv.name_hint:
            continue
        name = gv.name_hint
        if name.startswith(("tir_kv", "batch_", "tree_", "merge_", "copy_", "compact_", "fused_rope", "tir_")):
            continue
        try:
            args, nbytes = [], 0
            for p in func.params:
                buf = p  # TVM 0.27: PrimFunc params are the buffers themselves
                if not isinstance(p.ty, t.tirx.buffer.BufferType):
                    raise ValueError("scalar param")
                shape = [int(s) if isinstance(s, t.tirx.IntImm) else binds[str(s)] for s in buf.shape]
                dt = str(buf.dtype)
                arr = (np.random.rand(*shape) * (10 if "int" in dt else 1)).astype(dt) if "int" in dt else np.random.randn(*shape).astype(dt)
                if "int" in dt:
                    arr = np.zeros(shape, dt)
                args.append(tvm.runtime.tensor(arr, dev))
                nbytes += arr.nbytes
            f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
            fn = f["main"]
            fn(*args)
            times = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - t0)
            ms = float(np.median(times)) * 1e3
            rows.append((ms, name, nbytes / ms / 1e6, [list(x.shape) for x in args]))
        except Exception as err:  # noqa: BLE001 - report and continue
            rows.append((float("nan"), name, 0.0, str(err).splitlines()[-1][:80]))
    for ms, name, gbs, shapes in sorted(rows, key=lambda r: -(r[0] if r[0] == r[0] else 0)):
        print(f"{ms:9.4f} ms  {gbs:7.1f} GB/s  {name:40s} {shapes}")


if __name__ == "__main__":
    main()

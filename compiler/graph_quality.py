"""The quality gate of `kiln compile model.onnx --quant FMT` (issue 18): the float graph and
the quantized one, both built for this CPU by the same pipeline, run on the same inputs --
the user's (`--quality-inputs IN.npz`, names as in the graph) or random ones -- and the
error of every float output is measured against the float graph's:

  rel_l2    ||y_q - y_f|| / ||y_f||  (the headline number; `--max-error` bounds the largest)
  max_rel   max |y_q - y_f| / max |y_f|
  top1      for [batch, classes] outputs: the share of rows whose argmax agrees

Random inputs: runtime.graph.random_inputs (floats standard normal, integers 0 or 1 -- valid
as token ids and as masks --, a symbolic dimension 1 where it first leads an input, a batch,
else 32). Real inputs say more: random normal images are not photographs, so the error on
them is an estimate.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..errors import CompileError
from ..runtime.graph import random_inputs
from ..tvm_compat import compiler

def quality_inputs(inputs, path: Path | None, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """The inputs in the graph's order and where they came from. `inputs`: GraphIO entries."""
    if path is not None:
        try:
            with np.load(path, allow_pickle=False) as z:
                given = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise CompileError(f"--quality-inputs {path}: cannot read it: {str(err).splitlines()[0][:200]}") from None
        missing = [i.name for i in inputs if i.name not in given]
        if missing:
            raise CompileError(f"--quality-inputs {path}: no array for input(s) {', '.join(missing)} (keys: {', '.join(given) or 'none'})")
        out = []
        for i in inputs:
            a = given[i.name]
            if str(a.dtype) != ("bool" if i.dtype == "bool" else i.dtype):
                raise CompileError(f"--quality-inputs {path}: {i.name} is {a.dtype}, the graph takes {i.dtype}")
            if a.ndim != len(i.shape) or any(isinstance(d, int) and d != n for d, n in zip(i.shape, a.shape)):
                raise CompileError(f"--quality-inputs {path}: {i.name} has shape {list(a.shape)}, the graph takes {i.shape}")
            out.append(np.ascontiguousarray(a))
        return out, str(path)
    arrays, sizes = random_inputs([i.manifest() for i in inputs], seed=seed)
    return list(arrays.values()), f"random (seed {seed}; symbolic dims: {', '.join(f'{k}={v}' for k, v in sizes.items()) or 'none'})"


def run_library(lib_path: Path, args: list[np.ndarray]) -> list[np.ndarray]:
    """main(*args) of a graph library on this CPU, results as numpy arrays."""
    t = compiler()
    tvm = t.tvm
    dev = tvm.cpu(0)
    vm = t.relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
    res = vm["main"](*[tvm.runtime.tensor(a, dev) for a in args])
    res = list(res) if isinstance(res, (list, tuple)) or type(res).__name__ in ("Array", "Tuple") else [res]
    return [r.numpy() if hasattr(r, "numpy") else np.asarray(r) for r in res]


def compare(outputs, ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """Per float output: rel_l2, max_rel and (for [batch, classes]) top1; `worst_rel_l2` over all."""
    per = {}
    for o, f, q in zip(outputs, ref, got):
        if f.dtype.kind != "f" or f.size == 0:
            continue
        f64, q64 = f.astype(np.float64), q.astype(np.float64)
        entry = {"rel_l2": float(np.linalg.norm(q64 - f64) / max(np.linalg.norm(f64), 1e-30)),
                 "max_rel": float(np.abs(q64 - f64).max() / max(np.abs(f64).max(), 1e-30))}
        if f.ndim == 2 and f.shape[1] > 1:
            entry["top1"] = float((f.argmax(1) == q.argmax(1)).mean())
        per[o.name] = {k: round(v, 7) for k, v in entry.items()}
    return {"outputs": per, "worst_rel_l2": max((e["rel_l2"] for e in per.values()), default=0.0)}


def measure(float_lowered, tg, quant_lib: Path, graph, float_params: list[np.ndarray], quant_params: list[np.ndarray],
            inputs: tuple[list[np.ndarray], str], build_library) -> dict:
    """Build the float graph for this CPU in a temporary folder, run both libraries on
    `inputs` (quality_inputs' answer), compare."""
    args, source = inputs
    with tempfile.TemporaryDirectory(prefix="kiln-graph-gate-") as tmp:
        ref_lib = Path(tmp) / "float.so"
        build_library(float_lowered, ref_lib, tg, cuda_graphs=False)
        try:
            ref = run_library(ref_lib, args + float_params)
            got = run_library(quant_lib, args + quant_params)
        except Exception as err:  # noqa: BLE001 - a check inside the library: one line
            msg = str(err).strip().splitlines()
            raise CompileError(f"the quality gate could not run the graph on {source}: {type(err).__name__}: {(msg[-1] if msg else '')[:200]}") from None
    return {"inputs": source, **compare(graph.outputs, ref, got)}

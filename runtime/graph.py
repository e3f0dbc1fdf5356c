"""A compiled graph (an ONNX model; manifest kind "graph"): named numpy inputs
in, named numpy outputs out. TVM runtime only.

    from kiln.runtime import load
    m = load("model.kiln")                  # a graph artifact gives a GraphModel
    outs = m.run({"input_ids": ids, "attention_mask": mask})   # {output name: np.ndarray}

Inputs are checked against the manifest before anything runs (THREATS 31):
the set of names, each dtype (exact: no silent casts), rank, fixed
dimensions, and symbolic dimensions that must agree across inputs (every
`batch` the same number). Each failure is one line naming expected and given.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import ArtifactError, RequestError
from ..tvm_compat import runtime
from .artifact import Artifact, read_weights
from .dtypes import numpy_dtype

MAX_DIM = 1 << 31


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(np.bool_) if name == "bool" else numpy_dtype(name)


class GraphModel:
    """A graph artifact ready to run. Public attributes: artifact, inputs and
    outputs (the manifest's entries: name, dtype, shape with symbolic dimensions
    as names), device, load_seconds."""

    def __init__(self, artifact: Artifact, device: str = "cpu", random_weights: bool = False):
        t0 = time.perf_counter()
        rt = runtime()
        self._rt = rt
        self.artifact = artifact
        self.device = device
        m = artifact.manifest
        g = m["graph"]
        self.inputs: list[dict] = g["inputs"]
        self.outputs: list[dict] = g["outputs"]
        tgt = artifact.target_for(device)
        if device == "cpu":
            self.tvm_device = rt.tvm.cpu(0)
        else:
            from .session import cuda_device  # noqa: PLC0415

            self.tvm_device = cuda_device(rt, tgt, artifact.path)
        lib = rt.runtime.load_module(str(artifact.file(tgt["library"])))
        self._vm = rt.vm.VirtualMachine(lib, self.tvm_device)
        try:
            self._main = self._vm[g["function"]]
        except (AttributeError, KeyError, ValueError, RuntimeError):
            raise ArtifactError(f"{artifact.path}: the library has no function {g['function']!r}: the artifact is corrupt: recompile it") from None
        self.params = []
        if not m.get("weights_file") and m["params"] and not random_weights:
            raise ArtifactError(f"{artifact.path}: compiled with --no-weights: run it with random weights (kiln bench --random-weights)")
        if m.get("weights_file") and random_weights:
            raise RequestError("random_weights is for artifacts compiled with --no-weights")
        if random_weights:  # speed runs of graphs whose weights do not travel (session.random_weights_on: made on the device)
            from .session import random_weights_on  # noqa: PLC0415

            self.params = random_weights_on(rt, self.tvm_device, m["params"])
        for spec, raw in read_weights(artifact) if m.get("weights_file") else []:
            arr = rt.runtime.empty(tuple(spec["shape"]), spec["dtype"], self.tvm_device)
            arr.copyfrom(np.asarray(raw).view(numpy_dtype(spec["dtype"])).reshape(spec["shape"]))
            self.params.append(arr)
        self.load_seconds = time.perf_counter() - t0

    def check_inputs(self, inputs: dict) -> list[np.ndarray]:
        """The inputs as contiguous arrays in the graph's order, or RequestError (one line)."""
        if not isinstance(inputs, dict):
            raise RequestError(f"inputs must be a dict of name -> numpy array, got {type(inputs).__name__}")
        want = [i["name"] for i in self.inputs]
        extra = sorted(set(inputs) - set(want), key=str)
        missing = [n for n in want if n not in inputs]
        if extra or missing:
            raise RequestError(f"inputs: expected {', '.join(want)}" + (f"; missing {', '.join(missing)}" if missing else "")
                               + (f"; unknown {', '.join(map(str, extra))}" if extra else ""))
        symbols: dict[str, tuple[int, str]] = {}
        out = []
        for spec in self.inputs:
            name, a = spec["name"], inputs[spec["name"]]
            if not isinstance(a, np.ndarray):
                raise RequestError(f"input {name}: expected a numpy array, got {type(a).__name__}")
            dtype = _np_dtype(spec["dtype"])
            if a.dtype != dtype:
                raise RequestError(f"input {name}: dtype {a.dtype}, the graph takes {spec['dtype']} (convert with .astype)")
            shape = spec["shape"]
            if a.ndim != len(shape):
                raise RequestError(f"input {name}: rank {a.ndim} {list(a.shape)}, the graph takes rank {len(shape)} {shape}")
            for i, (d, n) in enumerate(zip(shape, a.shape)):
                if isinstance(d, int):
                    if n != d:
                        raise RequestError(f"input {name}: dimension {i} is {n}, the graph takes {d} (shape {shape})")
                    continue
                if not 1 <= n <= MAX_DIM:
                    raise RequestError(f"input {name}: dimension {i} ({d}) is {n}, must be in [1, {MAX_DIM}]")
                if d in symbols and symbols[d][0] != n:
                    raise RequestError(f"input {name}: dimension {i} ({d}) is {n}, but {d} is {symbols[d][0]} in input {symbols[d][1]}")
                symbols.setdefault(d, (n, name))
            out.append(a if a.flags.c_contiguous else a.copy(order="C"))  # (np.ascontiguousarray makes a 0-d array 1-d)
        return out

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        """Run the graph: {input name: array} -> {output name: array}, names as in the ONNX graph."""
        arrays = self.check_inputs(inputs)
        rt = self._rt
        try:
            res = self._main(*[rt.runtime.tensor(a, self.tvm_device) for a in arrays], *self.params)
        except Exception as err:  # noqa: BLE001 - a check inside the library (a shape the manifest could not express): one line
            msg = str(err).strip().splitlines()
            raise RequestError(f"{self.artifact.path}: the graph refused these inputs: {type(err).__name__}: {(msg[-1] if msg else '')[:300]}") from None
        results = [res] if len(self.outputs) == 1 else list(res)
        if len(results) != len(self.outputs):
            raise ArtifactError(f"{self.artifact.path}: the graph returned {len(results)} values for {len(self.outputs)} outputs: recompile it")
        return {spec["name"]: _to_numpy(r) for spec, r in zip(self.outputs, results)}


SEQ_DIM = 32  # random inputs: a symbolic dimension that is not an input's leading one


def random_inputs(inputs: list[dict], dims: dict[str, int] | None = None, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Random inputs of the declared shapes ({name: array}, the symbolic dims' values), for
    speed runs and the compile-time quality gate: floats standard normal, integers 0 or 1
    (valid token ids and masks), booleans random. A symbolic dimension takes `dims[name]`,
    else 1 where it first appears as an input's leading dimension (a batch), else SEQ_DIM."""
    rng = np.random.default_rng(seed)
    sizes = dict(dims or {})
    out = {}
    for spec in inputs:
        shape = [int(d) if isinstance(d, int) else sizes.setdefault(d, 1 if pos == 0 else SEQ_DIM) for pos, d in enumerate(spec["shape"])]
        dtype = _np_dtype(spec["dtype"])
        if dtype.kind == "b":
            a = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.kind in "iu":
            a = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        out[spec["name"]] = a
    return out, {k: v for k, v in sizes.items() if any(k in i["shape"] for i in inputs)}


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "numpy"):
        return value.numpy()
    if isinstance(value, (int, float, bool)):
        return np.asarray(value)
    return np.asarray(list(value), dtype=np.int64)  # a shape the graph returns as an output


def graph_speed_run(model, dims: dict[str, int] | None = None, seconds: float = 3.0, warmup: int = 3) -> dict:
    """`kiln bench` of a graph artifact: GraphModel.run on random inputs of the declared
    shapes (symbolic dims from `dims`, else graph.random_inputs' defaults), timed for
    `seconds` after `warmup` runs (at least 5 runs): median and 10th / 90th percentile ms."""
    feeds, sizes = random_inputs(model.inputs, dims)
    for _ in range(warmup):
        model.run(feeds)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        model.run(feeds)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"inputs": {k: list(v.shape) for k, v in feeds.items()}, "dims": sizes, "runs": len(times),
            "median_ms": round(float(np.median(ms)), 4), "p10_ms": round(float(np.percentile(ms, 10)), 4),
            "p90_ms": round(float(np.percentile(ms, 90)), 4), "device": model.device}

"""ONNX's backend test cases for kiln (issue 18): collected from the installed onnx
package, compiled by kiln's real compile (compile_onnx) for llvm, run through
kiln.runtime.load(...).run and compared with the expected outputs.
benchmarks/onnx_backend_suite.py runs all of them (docs/ONNX_BACKEND.md);
tests/test_onnx_backend.py a sample.

- node cases: onnx.backend.test.loader.load_node_model_tests() (the Python cases
  onnx's data/node folders are generated from; the wheel ships no data/node);
- simple, pytorch-converted, pytorch-operator: data/<suite>/<case>/model.onnx and
  test_data_set_*/{input,output}_*.pb;
- light: data/light/light_<net>.onnx and light_<net>_output_0.pb, inputs made as
  onnx's runner makes them (arange(n) / n in the input's shape, dims without a
  value 1), tolerances from data/real/test_<net>/data.json (data/real holds only
  those stubs, which point at the light files).

Opsets: kiln takes default-domain opsets 7-23. A case stamped outside them (the node
cases carry the newest opset defining their op, up to 28; pytorch-converted opset 6)
is re-stamped to the nearest opset kiln takes when every node means the same there
(`restamp`); `Case.as_given` keeps the refusal of the model as given.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RTOL, ATOL = 1e-3, 1e-5  # the tolerances (onnx's runner: rtol 1e-3, atol 1e-7)
SUITES = ("node", "simple", "pytorch-converted", "pytorch-operator", "light")
TRAINING_DOMAINS = ("ai.onnx.preview.training",)
STRING = 8  # TensorProto.STRING


@dataclass
class Case:
    name: str  # unique: "<suite>/<test name>"
    suite: str
    family: str  # node cases: the op (domain-qualified outside ai.onnx); others: the suite
    model: bytes  # serialized ModelProto (re-stamped where that applies)
    inputs: list  # [(graph input name, array)], the graph's order
    outputs: list  # [array], the graph's output order
    rtol: float  # the case's own tolerances (reported as `strict`)
    atol: float
    opset: int | None
    restamped_from: int | None = None
    as_given: str | None = None  # the verdict on the unmodified model, where it was re-stamped
    skip: str | None = None
    expanded: bool = False


@dataclass
class Result:
    name: str
    suite: str
    family: str
    status: str
    detail: str = ""
    opset: int | None = None
    restamped_from: int | None = None
    as_given: str | None = None
    expanded: bool = False
    pinned: list = field(default_factory=list)
    max_abs_err: float | None = None
    strict: bool | None = None  # within the case's own rtol / atol too
    seconds: float = 0.0


# ---------------------------------------------------------------- collecting cases

def _onnx_dir() -> Path:
    import onnx  # noqa: PLC0415

    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def _default_opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_nodes(g)


def skip_reason(model) -> str | None:
    """Why a case is out of scope, or None."""
    domains = {o.domain for o in model.opset_import} | {n.domain for n in _all_nodes(model.graph)}
    if domains & set(TRAINING_DOMAINS):
        return "training op (ai.onnx.preview.training)"
    for vi in list(model.graph.input) + list(model.graph.output):
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            return f"{kind.replace('_type', '')} value ({vi.name})"
        if vi.type.tensor_type.elem_type == STRING:
            return f"string tensor ({vi.name})"
    return None


def _same_signature(node, old, new, types: dict[str, int]) -> bool:
    """The node means the same under schema `old` as under `new`: same version, or the same
    inputs, outputs and attributes with every tensor type the node uses admitted by `old`
    (opsets 24-28 mostly widened type lists: float8e8m0, 2-bit and 4-bit types)."""
    if old.since_version == new.since_version:
        return True
    if ([(f.name, f.option) for f in old.inputs] != [(f.name, f.option) for f in new.inputs]
            or [(f.name, f.option) for f in old.outputs] != [(f.name, f.option) for f in new.outputs]
            or set(old.attributes) != set(new.attributes)):
        return False
    from onnx import TensorProto  # noqa: PLC0415

    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in old.type_constraints}
    for names, formals in ((node.input, old.inputs), (node.output, old.outputs)):
        for k, name in enumerate(names):
            if not name or not formals:
                continue
            formal = formals[min(k, len(formals) - 1)]  # a variadic last parameter takes the rest
            if name not in types:
                return False  # a type inference could not find: can't tell
            ts = f"tensor({TensorProto.DataType.Name(types[name]).lower()})"
            if ts not in allowed.get(formal.type_str, {formal.type_str}):
                return False
    return True


def restamp(model):
    """The model at the nearest opset kiln takes, if every node means the same there; else None."""
    import onnx  # noqa: PLC0415
    from onnx import defs  # noqa: PLC0415

    from kiln.frontends.onnx import OPSETS  # noqa: PLC0415

    v = _default_opset(model)
    if v is None or OPSETS[0] <= v <= OPSETS[1] or model.functions:
        return None
    to = min(max(v, OPSETS[0]), OPSETS[1])
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without types only identical schemas qualify
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info] if vi.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in _all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            return None
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                types.setdefault(node.output[0], a.t.data_type)  # Constant
        try:
            if not _same_signature(node, defs.get_schema(node.op_type, to), defs.get_schema(node.op_type, v), types):
                return None
        except Exception:  # noqa: BLE001 - no schema at one of the two opsets: not the same op
            return None
    m2 = type(model)()
    m2.CopyFrom(model)
    for o in m2.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = to
    return m2


def _case(name, suite, family, model, inputs, outputs, rtol, atol, expanded=False) -> Case:
    from kiln.frontends.onnx import OPSETS  # noqa: PLC0415

    inits = {i.name for i in model.graph.initializer}
    real = [vi.name for vi in model.graph.input if vi.name not in inits]
    skip = skip_reason(model)
    if skip:  # the data may be sequences, optionals, strings: not kept
        inputs, outputs = [], []
    c = Case(name, suite, family, b"", list(zip(real, [np.asarray(a) for a in inputs])), [np.asarray(a) for a in outputs],
             rtol, atol, _default_opset(model), expanded=expanded, skip=skip)
    v = c.opset
    if c.skip is None and v is not None and not OPSETS[0] <= v <= OPSETS[1]:
        c.as_given = f"unsupported: opset {v} is outside {OPSETS[0]}-{OPSETS[1]}"
        m2 = restamp(model)
        if m2 is not None:
            c.restamped_from, model = v, m2
    c.model = model.SerializeToString()
    return c


def node_cases(keep) -> list[Case]:
    from onnx.backend.test.loader import load_node_model_tests  # noqa: PLC0415

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        tests = load_node_model_tests()
    ops = {}  # a single-node case's op; an expanded case (the op's function body) counts under its op
    for t in tests:
        if len(t.model.graph.node) == 1:
            n = t.model.graph.node[0]
            ops[t.name] = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
    out = []
    for t in tests:
        name = f"node/{t.name}"
        if not keep(name):
            continue
        base = re.sub(r"_expanded(_ver\d+)?$", "", t.name)
        family = ops.get(t.name) or ops.get(base) or "(multi-node)"
        for k, (ins, outs) in enumerate(t.data_sets):
            out.append(_case(name + (f"#{k}" if k else ""), "node", family, t.model, ins, outs, t.rtol, t.atol,
                             expanded=base != t.name))
    return out


def _read_pb(path: str, type_proto):
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    data = Path(path).read_bytes()
    if type_proto.HasField("tensor_type"):
        t = onnx.TensorProto()
        t.ParseFromString(data)
        return numpy_helper.to_array(t)
    return None  # sequence / optional: such cases are skipped


def folder_cases(suite: str, keep) -> list[Case]:
    import onnx  # noqa: PLC0415

    out = []
    for d in sorted((_onnx_dir() / suite).iterdir()):
        name = f"{suite}/{d.name}"
        if not (d / "model.onnx").is_file() or not keep(name):
            continue
        model = onnx.load(str(d / "model.onnx"))
        for k, ds in enumerate(sorted(glob.glob(str(d / "test_data_set_*")))):
            nin, nout = (len(glob.glob(f"{ds}/{p}_*.pb")) for p in ("input", "output"))
            ins = [_read_pb(f"{ds}/input_{i}.pb", model.graph.input[i].type) for i in range(nin)]
            outs = [_read_pb(f"{ds}/output_{i}.pb", model.graph.output[i].type) for i in range(nout)]
            out.append(_case(name + (f"#{k}" if k else ""), suite, suite, model, ins, outs, 1e-3, 1e-7))
    return out


def light_cases(keep) -> list[Case]:
    """As onnx's runner does for data/light: inputs arange(n) / n (dims without a value: 1), float32."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    out = []
    for path in sorted((_onnx_dir() / "light").glob("light_*.onnx")):
        net = path.stem[len("light_"):]
        name = f"light/{net}"
        if not keep(name):
            continue
        model = onnx.load(str(path))
        inits = {i.name for i in model.graph.initializer}
        ins = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
            n = int(np.prod(shape))
            ins.append((np.arange(n).reshape(shape) / n).astype(np.float32))
        t = onnx.TensorProto()
        t.ParseFromString((path.parent / f"{path.stem}_output_0.pb").read_bytes())
        stub = _onnx_dir() / "real" / f"test_{net}" / "data.json"
        tol = json.loads(stub.read_text()) if stub.is_file() else {}
        out.append(_case(name, "light", "light", model, ins, [numpy_helper.to_array(t)], tol.get("rtol", 1e-3), tol.get("atol", 1e-7)))
    return out


def collect(suites, k: str | None = None, names=None) -> list[Case]:
    """The cases of `suites` whose name contains `k` and, if given, is in `names`."""
    keep = lambda n: (not k or k in n) and (names is None or n in names)  # noqa: E731
    cases = []
    for s in suites:
        cases += node_cases(keep) if s == "node" else light_cases(keep) if s == "light" else folder_cases(s, keep)
    return cases


# ---------------------------------------------------------------- one case, in a worker

def compare(got: list, want: list, rtol: float, atol: float) -> tuple[str | None, float | None]:
    """(None or what differs, max |got - want| over float outputs)."""
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}", None
    worst = None
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape:
            return f"output {i}: shape {list(g.shape)}, expected {list(w.shape)}", worst
        if g.dtype != w.dtype:
            return f"output {i}: dtype {g.dtype}, expected {w.dtype}", worst
        if w.dtype.kind in "biuO" or w.dtype.kind == "V":
            if not np.array_equal(g, w):
                return f"output {i}: {int((g != w).sum())} of {w.size} elements differ", worst
            continue
        g64, w64 = g.astype(np.float64), w.astype(np.float64)
        err = np.abs(g64 - w64)
        finite = np.isfinite(err)
        if finite.any():
            worst = max(worst or 0.0, float(err[finite].max()))
        ok = np.isclose(g64, w64, rtol=rtol, atol=atol, equal_nan=True)
        if not ok.all():
            j = np.unravel_index(int(np.argmin(ok)), ok.shape) if ok.ndim else ()
            return (f"output {i}: {int((~ok).sum())} of {w.size} elements outside rtol {rtol:g} / atol {atol:g} "
                    f"(max abs err {worst:.3g}; at {list(j)}: {g64[j]:.6g} vs {w64[j]:.6g})"), worst
    return None, worst


def _pins(model, inputs) -> list[str]:
    """input_shapes entries for inputs whose declared shape is not fully static (the data's shape)."""
    decl = {vi.name: vi for vi in model.graph.input}
    pins = []
    for name, a in inputs:
        tt = decl[name].type.tensor_type
        static = tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim)
        if not static and a.ndim and all(d >= 1 for d in a.shape):
            pins.append(f"{name}={','.join(map(str, a.shape))}")
    return pins


def run_case(case: Case, tmp: Path) -> Result:
    import onnx  # noqa: PLC0415

    from kiln.compiler.onnx_build import compile_onnx  # noqa: PLC0415
    from kiln.errors import KilnError  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    r = Result(case.name, case.suite, case.family, "unclean", opset=case.opset, restamped_from=case.restamped_from,
               as_given=case.as_given, expanded=case.expanded)
    t0 = time.perf_counter()
    d = Path(tempfile.mkdtemp(dir=tmp))
    try:
        model = onnx.ModelProto()
        model.ParseFromString(case.model)
        (d / "model.onnx").write_bytes(case.model)
        r.pinned = _pins(model, case.inputs)
        stage = "compile"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compile_onnx(d / "model.onnx", d / "model.kiln", input_shapes=tuple(r.pinned))
            stage = "run"
            got = load(d / "model.kiln").run(dict(case.inputs))
        except KilnError as err:
            msg = str(err).replace(str(d) + "/", "")
            if stage == "compile":
                r.status, r.detail = "unsupported", msg if "\n" not in msg else f"(multi-line message) {msg}"
            else:
                r.detail = f"{type(err).__name__} at run: {msg}"
            return r
        except Exception as err:  # noqa: BLE001 - every other type is a kiln bug: recorded, not raised
            lines = str(err).strip().splitlines()
            where = traceback.extract_tb(err.__traceback__)[-1]
            r.detail = (f"{type(err).__name__} at {stage}: {(lines[-1] if lines else '')[:300]} "
                        f"({Path(where.filename).name}:{where.lineno})")
            return r
        diff, r.max_abs_err = compare(list(got.values()), case.outputs, RTOL, ATOL)
        r.status, r.detail = ("mismatch", diff) if diff else ("pass", "")
        if diff is None:
            r.strict = compare(list(got.values()), case.outputs, case.rtol, case.atol)[0] is None
        return r
    finally:
        r.seconds = round(time.perf_counter() - t0, 3)
        shutil.rmtree(d, ignore_errors=True)

"""A validated ONNX model (frontends/onnx.py) -> a Relax IRModule, through
TVM's ONNX importer with kiln's own layer around it:

- pinned input shapes (`--input-shape NAME=1,3,224,224`; an entry that is a
  name keeps that dimension symbolic) are written into the graph's inputs;
  every other symbolic dimension stays dynamic;
- shape arithmetic on constants is folded before import (onnx's reference
  evaluator, one node at a time, only ops whose result size is known to be
  small first): TVM 0.27's importer fails on some of what exporters emit
  (ConstantOfShape of an empty shape: "broadcast_to expects ...");
- float initializers of at least LIFT_MIN_ELEMENTS elements become params
  (graph inputs after the real ones; weights.safetensors), the rest stay
  constants in the code: converters need shapes, axes, scales and small
  tables as values, and those are a few KB.

The module's `main(*inputs, *params)` returns one tensor or a tuple, in the
order of the graph's outputs.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import CompileError, UnsupportedModelError
from ..tvm_compat import onnx_importer
from .onnx_ops import CONVERTERS
from .onnx_rnn import PACKED_ATTR, RNN_CONVERTERS, pack_r, packed_r_shape
from .onnx_symbolic import SYMBOLIC_CONVERTERS
from .onnx import DTYPES, FLOAT_DTYPES, Initializer, OnnxModel, check_operators, dims_of, onnx_package

LIFT_MIN_ELEMENTS = 256  # float initializers this big or bigger become params
FOLD_MAX_ELEMENTS = 1 << 16  # constants folded before import: shape arithmetic, small tables

# ops folded when all inputs are constants; the size of what they make is bounded by their inputs'
# (broadcasting ops by the product, checked after evaluation)
_FOLD_OPS = frozenset("""Shape Size Gather Unsqueeze Squeeze Concat Slice Cast CastLike Add Sub Mul Div Mod Neg Abs
    Equal Less Greater LessOrEqual GreaterOrEqual Not And Or Xor Where Reshape Identity Min Max Floor Ceil Sqrt
    Transpose Flatten ReduceProd ReduceSum ReduceMin ReduceMax Sign Pow Constant ConstantOfShape Range Expand Tile""".split())


@dataclass
class GraphIO:
    name: str
    dtype: str
    shape: list  # ints and symbol names (str)

    def manifest(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class ImportedGraph:
    mod: object  # tvm IRModule; main(*inputs, *params)
    inputs: list[GraphIO]
    outputs: list[GraphIO]
    params: list[Initializer]  # main's parameters after the inputs, in order (weights.safetensors)
    folded: int  # nodes folded into constants before import


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, list]:
    """`NAME=1,3,224,224` (an entry that is an identifier keeps that dimension symbolic) -> {name: dims}."""
    out: dict[str, list] = {}
    for spec in specs:
        name, eq, dims = spec.rpartition("=")
        if not eq or not name:
            raise CompileError(f"--input-shape {spec!r}: expected NAME=D1,D2,... (e.g. image=1,3,224,224)")
        parsed: list = []
        for d in dims.split(","):
            d = d.strip()
            if re.fullmatch(r"\d{1,10}", d) and 1 <= int(d) <= 1 << 31:
                parsed.append(int(d))
            elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", d):
                parsed.append(d)
            else:
                raise CompileError(f"--input-shape {spec!r}: dimension {d!r} is neither an integer in [1, 2^31] nor a name")
        if name in out:
            raise CompileError(f"--input-shape {name}: given twice")
        out[name] = parsed
    return out


def graph_io(model: OnnxModel, pinned: dict[str, list]) -> tuple[list[GraphIO], list[GraphIO]]:
    """The graph's real inputs (initializer defaults left out) with pinned shapes applied, and its outputs."""
    g = model.graph
    inputs = []
    for vi in g.input:
        if vi.name in model.initializers:
            continue
        dtype, dims = dims_of(vi)
        if vi.name in pinned:
            want = pinned[vi.name]
            if dims is not None and len(dims) != len(want):
                raise CompileError(f"--input-shape {vi.name}: {len(want)} dimensions given, the model's input has {len(dims)} {dims}")
            for i, (d, w) in enumerate(zip(dims or want, want)):
                if isinstance(d, int) and d != w:
                    raise CompileError(f"--input-shape {vi.name}: dimension {i} is {d} in the model, {w} given")
            dims = list(want)
        elif dims is None:
            raise CompileError(f"{model.path}: input {vi.name!r} has no declared shape: give it with --input-shape {vi.name}=D1,D2,...")
        inputs.append(GraphIO(vi.name, dtype, dims))
    unknown = sorted(set(pinned) - {i.name for i in inputs})
    if unknown:
        raise CompileError(f"--input-shape {unknown[0]}: the model has no input of that name; its inputs: {', '.join(i.name for i in inputs)}")
    outputs = []
    for vi in g.output:
        dtype, dims = dims_of(vi)
        outputs.append(GraphIO(vi.name, dtype, dims if dims is not None else []))
    return inputs, outputs


def import_onnx(model: OnnxModel, pinned: dict[str, list] | None = None) -> ImportedGraph:
    """Validate operators, fold constant shape arithmetic, lift weights to params and import.
    MatMul weights are stored transposed (_nt_matmuls) unless the flattening that needs
    fails on this graph (an activation whose shape the importer does not know): then
    the graph is imported again as it is."""
    try:
        return _import(model, pinned, nt=True)
    except UnsupportedModelError as err:
        if "node kiln_nt" not in str(err):
            raise
    return _import(model, pinned, nt=False)


def _import(model: OnnxModel, pinned: dict[str, list] | None, nt: bool) -> ImportedGraph:
    t = onnx_importer()
    check_operators(model, lambda op: op in _converters() or t.supported(op))
    inputs, outputs = graph_io(model, pinned or {})
    onnx = onnx_package()
    from onnx import helper  # noqa: PLC0415

    g = model.graph
    weights = {**model.initializers, **model.constants}
    lifted = [i for i in weights.values() if i.dtype in FLOAT_DTYPES and i.size >= LIFT_MIN_ELEMENTS]
    lifted_names = {i.name for i in lifted}
    g2 = onnx.GraphProto(name=g.name or "main")
    consts: dict[str, np.ndarray] = {}
    for init in model.initializers.values():
        if init.name in lifted_names:
            continue
        arr = init.load()
        if init.size <= FOLD_MAX_ELEMENTS:
            consts[init.name] = arr
        g2.initializer.append(_tensor(arr, init.name, init.dtype))
    for io_ in inputs:
        g2.input.append(helper.make_tensor_value_info(io_.name, _elem_type(io_.dtype), io_.shape))
    nodes, lifted, extra = _nt_matmuls(list(model.graph.node), lifted) if nt else (list(model.graph.node), lifted, [])
    nodes, lifted = _packed_recurrences(nodes, lifted)
    for name, arr in extra:
        consts[name] = arr
        g2.initializer.append(_tensor(arr, name, str(arr.dtype)))
    for init in lifted:
        g2.input.append(helper.make_tensor_value_info(init.name, _elem_type(init.dtype), list(init.shape)))
    static = {i.name: [int(d) for d in i.shape] for i in inputs if all(isinstance(d, int) for d in i.shape)}
    static.update({i.name: [int(d) for d in i.shape] for i in lifted})
    nodes, folded = _fold(nodes, consts, lifted_names, model.proto.opset_import, static)
    g2.node.extend(nodes)
    g2.output.extend(g.output)
    m2 = onnx.ModelProto(ir_version=model.proto.ir_version, producer_name=model.proto.producer_name)
    m2.opset_import.extend(model.proto.opset_import)
    m2.graph.CopyFrom(g2)

    importer = _importer_class(t)(None, None, keep_params_in_input=False, sanitize=True)
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            mod = importer.from_onnx(m2.graph, model.opset)
    except Exception as err:  # noqa: BLE001 - the importer raises many types; one line naming the node
        node = next(((k, n) for k, n in enumerate(nodes) if any(o and o not in importer._nodes for o in n.output)), None)  # noqa: SLF001
        where = f"node {node[1].name or '#' + str(node[0])} ({node[1].op_type})" if node else "the graph"
        if isinstance(err, UnsupportedModelError):  # a kiln converter's refusal: its own words
            raise UnsupportedModelError(f"{model.path}: {where}, opset {model.opset}: {err}") from None
        msg = str(err).strip().splitlines()
        raise UnsupportedModelError(f"{model.path}: TVM's ONNX importer failed on {where}, opset {model.opset}: "
                                    f"{type(err).__name__}: {(msg[-1] if msg else '')[:200]}") from None
    _shapes_from_ir(mod, outputs)
    return ImportedGraph(mod, inputs, outputs, lifted, folded)


def _converters() -> dict:
    """{op: [converter, ...]}, kiln's converters in the order tried: frontends/onnx_ops.py's table,
    RNN / GRU / LSTM (frontends/onnx_rnn.py) and arithmetic on symbolic dimensions
    (frontends/onnx_symbolic.py: Div, Resize). An op may have several (Div: integer tensors in
    onnx_ops, dimensions in onnx_symbolic); the first that does not return None converts the node."""
    out: dict = {}
    for table in (CONVERTERS, RNN_CONVERTERS, SYMBOLIC_CONVERTERS):
        for op, convert in table.items():
            out.setdefault(op, []).append(convert)
    return out


def _importer_class(t):
    """TVM's importer with kiln's converters tried first."""
    converters = _converters()

    class Importer(t.Importer):
        def _check_for_unsupported_ops(self, graph):
            pass  # check_operators ran before import, knowing kiln's converters (TVM's check does not: GRU)

        def _convert_operator(self, op_name, inputs, attrs, opset):
            out = None
            for convert in converters.get(op_name, ()):
                out = convert(t, self.bb, inputs, attrs)
                if out is not None:
                    break
            if out is None:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            return self.bb.normalize(out)

    return Importer


def _shapes_from_ir(mod, outputs: list[GraphIO]) -> None:
    """Output shapes as the importer derived them (the inputs' symbols: `batch`, `seq`),
    where it knows them; exporters often declare fresh names for every output dim."""
    t = onnx_importer()
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if len(outputs) > 1 and hasattr(ret, "fields") else [ret]
    for out, ty in zip(outputs, fields):
        shape = getattr(ty, "shape", None)
        values = getattr(shape, "values", None)
        if values is None:
            continue
        dims = []
        for v in values:
            if isinstance(v, t.tvm.tirx.IntImm):
                dims.append(int(v))
            else:
                dims.append(str(v).replace("T.int64(", "").replace(")", "") if not isinstance(v, t.tvm.tirx.Var) else v.name)
        out.shape = dims


def _elem_type(dtype: str) -> int:
    return next(code for code, name in DTYPES.items() if name == dtype)


def _tensor(arr: np.ndarray, name: str, dtype: str):
    from onnx import helper, numpy_helper  # noqa: PLC0415

    if dtype == "bfloat16":  # numpy_helper has no bf16 from ml_dtypes arrays: raw bits
        return helper.make_tensor(name, _elem_type(dtype), arr.shape, arr.view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(np.asarray(arr), name)


# ---------------------------------------------------------------- weight layout

def _nt_matmuls(nodes: list, lifted: list[Initializer]) -> tuple[list, list[Initializer], list[tuple[str, np.ndarray]]]:
    """MatMul(A, W) with W a 2-D param [K, N] used by MatMuls only: W is stored
    transposed ([N, K], param `W.T`: the layout kiln's GEMM/GEMV rules read, as for
    the LLMs; done once here, as data) and A flattened to [-1, K]:
        Y = Reshape(MatMul(Reshape(A, [-1, K]), Transpose(W.T)), Concat(Shape(A)[:-1], [N]))
    FuseTransposeMatmul then makes one C[m, n] = sum_k A[m, k] W.T[n, k] kernel with m
    the rows of A, which CpuMatmul / CpuGemv schedule (a [batch, seq, K] x [K, N]
    matmul matched neither, and ran as TVM's serial default loops)."""
    from onnx import helper  # noqa: PLC0415

    by_name = {i.name: i for i in lifted}
    users: dict[str, list] = {}
    for node in nodes:
        for k, i in enumerate(node.input):
            if i in by_name:
                users.setdefault(i, []).append((node.op_type, k))
    nt = {n for n, us in users.items() if len(by_name[n].shape) == 2 and all(u == ("MatMul", 1) for u in us)}
    if not nt:
        return nodes, lifted, []
    out, extra, new_lifted = [], [], []
    for init in lifted:
        if init.name in nt:
            k, n = init.shape
            new_lifted.append(Initializer(f"{init.name}.T", init.dtype, (n, k), lambda load=init.load: np.ascontiguousarray(load().T)))
            extra += [(f"kiln_rows_by_{k}", np.array([-1, k], np.int64)), (f"kiln_cols_{n}", np.array([n], np.int64))]
        else:
            new_lifted.append(init)
    extra += [("kiln_zero", np.array([0], np.int64)), ("kiln_minus_one", np.array([-1], np.int64))]
    for j, node in enumerate(nodes):
        if node.op_type != "MatMul" or node.input[1] not in nt:
            out.append(node)
            continue
        a, w, y = node.input[0], node.input[1], node.output[0]
        k, n = by_name[w].shape
        p = f"kiln_nt{j}"
        out += [helper.make_node("Transpose", [f"{w}.T"], [f"{p}_w"], perm=[1, 0], name=f"{p}_transpose"),
                helper.make_node("Reshape", [a, f"kiln_rows_by_{k}"], [f"{p}_a2"], name=f"{p}_flatten"),
                helper.make_node("MatMul", [f"{p}_a2", f"{p}_w"], [f"{p}_y2"], name=node.name or f"{p}_matmul"),
                helper.make_node("Shape", [a], [f"{p}_shape"], name=f"{p}_shape"),
                helper.make_node("Slice", [f"{p}_shape", "kiln_zero", "kiln_minus_one"], [f"{p}_lead"], name=f"{p}_lead"),
                helper.make_node("Concat", [f"{p}_lead", f"kiln_cols_{n}"], [f"{p}_yshape"], axis=0, name=f"{p}_yshape"),
                helper.make_node("Reshape", [f"{p}_y2", f"{p}_yshape"], [y], name=f"{p}_unflatten")]
    return out, new_lifted, list(dict(extra).items())


def _packed_recurrences(nodes: list, lifted: list[Initializer]) -> tuple[list, list[Initializer]]:
    """R of RNN / GRU / LSTM nodes (input 2), a float32 param used by nodes of one op type
    only, is stored in the layout the recurrence kernel reads (onnx_rnn.pack_r: [D, blocks,
    H, V], param `R.packed`), once, as data; the nodes get the attribute kiln_packed_r=1.
    Packed per call instead, a 512-wide LSTM's R cost ~2 ms a run."""
    from onnx import helper  # noqa: PLC0415

    by_name = {i.name: i for i in lifted}
    users: dict[str, set] = {}
    for node in nodes:
        for k, i in enumerate(node.input):
            if i in by_name:
                users.setdefault(i, set()).add((node.op_type, k))
    packed = {n: next(iter(us))[0] for n, us in users.items()
              if len(us) == 1 and next(iter(us))[0] in RNN_CONVERTERS and next(iter(us))[1] == 2
              and by_name[n].dtype == "float32" and len(by_name[n].shape) == 3}
    if not packed:
        return nodes, lifted
    new_lifted = []
    for init in lifted:
        if init.name in packed:
            op = packed[init.name]
            init = Initializer(f"{init.name}.packed", init.dtype, packed_r_shape(op, init.shape), lambda load=init.load, op=op: pack_r(op, load()))
        new_lifted.append(init)
    out = []
    for node in nodes:
        if len(node.input) > 2 and node.input[2] in packed:
            node2 = type(node)()
            node2.CopyFrom(node)
            node2.input[2] = f"{node.input[2]}.packed"
            node2.attribute.append(helper.make_attribute(PACKED_ATTR, 1))
            node = node2
        out.append(node)
    return out, new_lifted


# ---------------------------------------------------------------- constant folding

def _fold(nodes: list, consts: dict[str, np.ndarray], skip: set[str], opset_import,
          static: dict[str, list[int]] | None = None) -> tuple[list, int]:
    """The nodes with constant shape arithmetic replaced by Constant nodes;
    Constant nodes whose output is in `skip` (lifted to params) left out. `static`: values
    whose shape is fixed (graph inputs of fixed or pinned shape, params): Shape / Size of
    them fold too (TVM's importer gives a Shape a ShapeExpr, which ops such as Cast or Div
    then refuse: "Node cannot handle ShapeExpr inputs" -- 142 backend-suite cases)."""
    from onnx import helper  # noqa: PLC0415

    static = static or {}
    out, folded = [], 0
    for node in nodes:
        if node.op_type == "Constant" and node.output[0] in skip:
            continue
        if node.domain in ("", "ai.onnx") and node.op_type in ("Shape", "Size") and node.input and node.input[0] in static \
                and node.input[0] not in consts:
            dims = static[node.input[0]]
            if node.op_type == "Size":
                vals = [np.array(int(np.prod(dims)), np.int64)]
            else:
                at = {a.name: a.i for a in node.attribute}
                vals = [np.array(dims[at.get("start", 0):at.get("end", len(dims))], np.int64)]  # slicing clamps as ONNX does
        else:
            ok = (node.domain in ("", "ai.onnx") and node.op_type in _FOLD_OPS and all(not i or i in consts for i in node.input)
                  and not any(a.type in (5, 10) for a in node.attribute))  # no subgraphs
            vals = _evaluate(node, consts, opset_import) if ok else None
        if vals is None:
            out.append(node)
            continue
        for o, v in zip(node.output, vals):
            consts[o] = v
        if node.op_type == "Constant":
            out.append(node)
        else:
            folded += 1
            out.extend(helper.make_node("Constant", [], [o], value=_tensor(v, o, str(v.dtype)), name=f"{node.name or o}_folded")
                       for o, v in zip(node.output, vals) if o)
    return out, folded


def _size_before(node, ins: list[np.ndarray | None]) -> int | None:
    """The result size of ops whose result can be far larger than their inputs, from the inputs; None: can't tell."""
    try:
        if node.op_type == "ConstantOfShape":
            return math.prod(int(d) for d in ins[0].reshape(-1))
        if node.op_type == "Range":
            start, limit, delta = (float(x.reshape(-1)[0]) for x in ins[:3])
            return 0 if delta == 0 else max(0, math.ceil((limit - start) / delta))
        if node.op_type == "Expand":
            shape = np.broadcast_shapes(ins[0].shape, tuple(int(d) for d in ins[1].reshape(-1)))
            return math.prod(shape)
        if node.op_type == "Tile":
            return ins[0].size * math.prod(int(r) for r in ins[1].reshape(-1))
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    return 0


def _evaluate(node, consts, opset_import) -> list[np.ndarray] | None:
    from onnx import helper  # noqa: PLC0415
    from onnx.reference import ReferenceEvaluator  # noqa: PLC0415

    ins = [consts[i] if i else None for i in node.input]
    size = _size_before(node, ins)
    if size is None or size > FOLD_MAX_ELEMENTS or node.op_type == "Range" and float(ins[2].reshape(-1)[0]) == 0:
        return None
    try:
        graph = helper.make_graph([node], "fold", [helper.make_tensor_value_info(i, 0, None) for i in node.input if i],
                                  [helper.make_tensor_value_info(o, 0, None) for o in node.output if o])
        model = helper.make_model(graph, opset_imports=list(opset_import))
        model.ir_version = 8
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            vals = ReferenceEvaluator(model).run(None, {i: consts[i] for i in node.input if i})
    except Exception:  # noqa: BLE001 - leave the node to the importer, which reports what it cannot do
        return None
    vals = [np.asarray(v) for v in vals]
    if any(v.size > FOLD_MAX_ELEMENTS or v.dtype == object for v in vals):
        return None
    return vals


__all__ = ["GraphIO", "ImportedGraph", "import_onnx", "parse_input_shapes"]

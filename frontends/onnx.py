"""Read an untrusted .onnx file (issue 18; THREATS 16, 31, 32).

Order, each step bounded before the next allocates anything:
1. the file's size (protobuf's 2 GiB limit, at least a few bytes);
2. a scan of the protobuf wire format without parsing it: IR version, opsets,
   and the counts of nodes, initializers, inputs and outputs (a truncated file
   or a length past the end of the file fails here);
3. the full parse (the `onnx` package), then the graph's checks: opset in
   range, every name defined before use (no cycles, no undefined values),
   initializer sizes equal to their bytes, input dims, operators the importer
   converts (one line naming op, node and opset);
4. external data: only files inside the model's own folder (no absolute
   paths, no `..`, no symlinks out), offset + length inside the file, read by
   kiln (never the onnx package's loader).

`read_onnx(path)` returns an `OnnxModel`: the parsed graph and, for every
initializer, a thunk that produces its numpy array.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError, UnsupportedModelError

MAX_FILE_BYTES = (2 << 30) - 1  # protobuf cannot parse more
MAX_NODES = 1 << 20
MAX_TENSORS = 1 << 20  # initializers, inputs, outputs, value infos
MAX_ELEMENTS = 1 << 36  # one tensor; larger is refused before any size arithmetic
MAX_DIM = 1 << 31  # one input dimension
OPSETS = (7, 23)  # the default domain's opsets TVM 0.27's importer has converters up to
DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX TensorProto data types kiln takes, by code -> dtype name (runtime/dtypes.py names)
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
          10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_ITEMSIZE = {"bool": 1, "bfloat16": 2}


def itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize


@dataclass
class Initializer:
    name: str
    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]  # the array, read on demand (external data: from its file)
    external: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class OnnxModel:
    """A validated ONNX model. proto: the parsed ModelProto (initializers with
    external data still point at their files; use `initializers` to read them)."""

    path: Path
    proto: object  # onnx.ModelProto
    opset: int
    initializers: dict[str, Initializer] = field(default_factory=dict)
    constants: dict[str, Initializer] = field(default_factory=dict)  # Constant nodes' tensors, by output name (checked like initializers)

    @property
    def graph(self):
        return self.proto.graph


# ---------------------------------------------------------------- 1-2: size and wire scan

def _varint(buf: bytes, i: int, end: int, path: Path) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= end or shift > 63:
            raise ModelFormatError(f"{path}: truncated or malformed protobuf (a varint runs past its message)")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes, start: int, end: int, path: Path):
    """(field number, wire type, varint value or (start, end) of a length-delimited field)."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end, path)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i, end, path)
            yield num, wt, v
        elif wt == 2:
            n, i = _varint(buf, i, end, path)
            if n > end - i:
                raise ModelFormatError(f"{path}: truncated file (a field of {n} bytes runs past the end of its message)")
            yield num, wt, (i, i + n)
            i += n
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            if n > end - i:
                raise ModelFormatError(f"{path}: truncated file (a fixed-size field runs past the end)")
            i += n
        else:
            raise ModelFormatError(f"{path}: not an ONNX file (protobuf wire type {wt} where a ModelProto has none)")


def scan_model(buf: bytes, path: Path) -> dict:
    """Counts and opsets from the wire format, before the full parse."""
    out = {"ir_version": None, "opsets": {}, "graphs": 0, "node": 0, "initializer": 0, "tensors": 0}
    for num, wt, v in _fields(buf, 0, len(buf), path):
        if num == 1 and wt == 0:
            out["ir_version"] = v
        elif num == 8 and wt == 2:  # OperatorSetIdProto: domain (1), version (2)
            domain, version = "", 0
            for n2, w2, v2 in _fields(buf, v[0], v[1], path):
                if n2 == 1 and w2 == 2:
                    domain = buf[v2[0]:v2[1]].decode("utf-8", "replace")
                elif n2 == 2 and w2 == 0:
                    version = v2
            out["opsets"][domain] = version
        elif num == 7 and wt == 2:  # GraphProto: node 1, initializer 5, sparse 15, input 11, output 12, value_info 13
            out["graphs"] += 1
            for n2, _w2, _v2 in _fields(buf, v[0], v[1], path):
                if n2 == 1:
                    out["node"] += 1
                elif n2 in (5, 15):
                    out["initializer"] += 1
                    out["tensors"] += 1
                elif n2 in (11, 12, 13):
                    out["tensors"] += 1
    return out


# ---------------------------------------------------------------- 3: parse and check

def read_onnx(path: str | Path) -> OnnxModel:
    """Open and validate an .onnx file; ModelFormatError / UnsupportedModelError name the file on failure."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ModelFormatError(f"{path}: cannot read ({err.strerror})") from None
    if not path.is_file():
        raise ModelFormatError(f"{path}: not a file")
    if size < 8:
        raise ModelFormatError(f"{path}: {size} bytes is too small to be an ONNX model")
    if size > MAX_FILE_BYTES:
        raise ModelFormatError(f"{path}: {size} bytes is over protobuf's 2 GiB limit (large models keep weights as external data)")
    buf = path.read_bytes()
    info = scan_model(buf, path)
    if info["graphs"] != 1:
        raise ModelFormatError(f"{path}: not an ONNX model (no graph)" if info["graphs"] == 0 else f"{path}: {info['graphs']} graphs in one model")
    if info["node"] > MAX_NODES or info["tensors"] > MAX_TENSORS:
        raise ModelFormatError(f"{path}: {info['node']} nodes and {info['tensors']} tensors; kiln reads at most {MAX_NODES} and {MAX_TENSORS}")
    if info["ir_version"] is None or info["ir_version"] < 3:
        raise UnsupportedModelError(f"{path}: ONNX IR version {info['ir_version']}; kiln reads version 3 (ONNX 1.1) and newer")
    opset = next((v for d, v in info["opsets"].items() if d in DEFAULT_DOMAINS), None)
    if opset is None:
        raise UnsupportedModelError(f"{path}: no opset for the default ONNX domain in opset_import")
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise UnsupportedModelError(f"{path}: opset {opset} is outside the {OPSETS[0]}-{OPSETS[1]} that kiln's importer converts; "
                                    f"re-export with an opset in that range")
    onnx = onnx_package()
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(buf)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and recursion limits
        raise ModelFormatError(f"{path}: not a valid ONNX protobuf ({type(err).__name__}: {str(err)[:120]})") from None
    del buf
    model = OnnxModel(path, proto, opset)
    _check_graph(model)
    return model


def onnx_package():
    """The `onnx` package, or a one-line error saying how to install it."""
    try:
        import onnx  # noqa: PLC0415
    except ImportError:
        raise UnsupportedModelError("reading .onnx files needs the Python package onnx (pip install 'kiln[onnx]' or pip install onnx)") from None
    return onnx


def dims_of(value_info) -> tuple[str, list[int | str] | None]:
    """(dtype name or '?code', dims: ints and symbol names; None when the rank is unknown)."""
    tt = value_info.type.tensor_type
    dtype = DTYPES.get(tt.elem_type, f"?{tt.elem_type}")
    if not tt.HasField("shape"):
        return dtype, None
    dims: list[int | str] = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param not in ("", "?"):
            dims.append(d.dim_param)
        else:  # no name, "?" or -1 (Paddle's exports): a symbol of its own
            dims.append(_symbol(f"{value_info.name}_dim{i}"))
    return dtype, dims


def _symbol(name: str) -> str:
    """A dimension name from a tensor name (any string) that reads as an identifier."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out[:1].isalpha() or out[:1] == "_" else "d_" + out


def _check_graph(model: OnnxModel) -> None:
    path, g = model.path, model.graph
    if len(g.sparse_initializer):
        raise UnsupportedModelError(f"{path}: sparse initializer {g.sparse_initializer[0].values.name!r}: not supported")
    defined: set[str] = set()
    for t in g.initializer:
        if not t.name or t.name in defined:
            raise ModelFormatError(f"{path}: initializer {t.name!r} is {'unnamed' if not t.name else 'defined twice'}")
        model.initializers[t.name] = _initializer(model, t)
        defined.add(t.name)
    for vi in g.input:
        if vi.name in defined:
            continue  # IR < 4: initializers are listed as inputs too (defaults)
        if not vi.name:
            raise ModelFormatError(f"{path}: a graph input has no name")
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedModelError(f"{path}: input {vi.name!r} is not a tensor (sequences, maps and optionals are not supported)")
        dtype, dims = dims_of(vi)
        if dtype.startswith("?"):
            raise UnsupportedModelError(f"{path}: input {vi.name!r} has ONNX data type {dtype[1:]}; supported: {', '.join(DTYPES.values())}")
        for d in dims or []:
            if isinstance(d, int) and not 0 <= d <= MAX_DIM:
                raise ModelFormatError(f"{path}: input {vi.name!r} has dimension {d}, outside [0, {MAX_DIM}]")
        defined.add(vi.name)
    for k, node in enumerate(g.node):
        label = _node_label(node, k)
        for i in node.input:
            if i and i not in defined:
                raise ModelFormatError(f"{path}: node {label} reads {i!r}, which no earlier node, input or initializer defines "
                                       f"(a cycle, an undefined value, or nodes out of order)")
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.output) == 1:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == 4), None)  # a TENSOR attribute
            if value is not None:  # Paddle's exports keep their weights here
                value.name = node.output[0]
                model.constants[node.output[0]] = _initializer(model, value)
        for o in node.output:
            if o and o in defined:
                raise ModelFormatError(f"{path}: node {label} writes {o!r}, which is already defined")
            defined.add(o)
    for vi in g.output:
        if vi.name not in defined:
            raise ModelFormatError(f"{path}: graph output {vi.name!r} is never computed")
    if not len(g.output):
        raise ModelFormatError(f"{path}: the graph has no outputs")


def _node_label(node, k: int) -> str:
    return repr(node.name) if node.name else f"#{k} ({node.op_type})"


def check_operators(model: OnnxModel, supported: Callable[[str], bool]) -> None:
    """One line naming the first operator the importer cannot convert, its node and the opset;
    `supported(op_type)` asks the importer (compiler side)."""
    seen: dict[str, str] = {}
    for k, node in enumerate(model.graph.node):
        if node.domain not in DEFAULT_DOMAINS:
            raise UnsupportedModelError(f"{model.path}: operator {node.domain}.{node.op_type} (node {_node_label(node, k)}, opset "
                                        f"{model.opset}) is outside the default ONNX domain; kiln converts ai.onnx operators only")
        if node.op_type not in seen:
            seen[node.op_type] = _node_label(node, k)
    missing = [op for op in seen if not supported(op)]
    if missing:
        more = f" (also unsupported: {', '.join(missing[1:6])})" if len(missing) > 1 else ""
        raise UnsupportedModelError(f"{model.path}: operator {missing[0]} (node {seen[missing[0]]}, opset {model.opset}) is not "
                                    f"supported by kiln's ONNX importer{more}")


# ---------------------------------------------------------------- initializers and external data

_TYPED_FIELDS = {"float32": "float_data", "float16": "int32_data", "bfloat16": "int32_data", "bool": "int32_data",
                 "int8": "int32_data", "uint8": "int32_data", "int16": "int32_data", "uint16": "int32_data",
                 "int32": "int32_data", "int64": "int64_data", "float64": "double_data", "uint32": "uint64_data", "uint64": "uint64_data"}


def _initializer(model: OnnxModel, t) -> Initializer:
    path = model.path
    dtype = DTYPES.get(t.data_type)
    if dtype is None:
        raise UnsupportedModelError(f"{path}: initializer {t.name!r} has ONNX data type {t.data_type}; supported: {', '.join(DTYPES.values())}")
    shape = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{path}: initializer {t.name!r} has a negative dimension {list(shape)}")
    n = 1
    for d in shape:
        n *= d
        if n > MAX_ELEMENTS:
            raise ModelFormatError(f"{path}: initializer {t.name!r} has shape {list(shape)}: over {MAX_ELEMENTS} elements")
    if t.HasField("segment"):
        raise UnsupportedModelError(f"{path}: initializer {t.name!r} is segmented; not supported")
    nbytes = n * itemsize(dtype)
    if t.data_location == 1:  # EXTERNAL
        return _external(model, t, dtype, shape, nbytes)
    if t.raw_data:
        if len(t.raw_data) != nbytes:
            raise ModelFormatError(f"{path}: initializer {t.name!r} has {len(t.raw_data)} bytes of data; shape {list(shape)} x {dtype} needs {nbytes}")
    else:
        have = len(getattr(t, _TYPED_FIELDS[dtype]))
        if have != n:
            raise ModelFormatError(f"{path}: initializer {t.name!r} has {have} values; shape {list(shape)} needs {n}")

    def load():
        from onnx import numpy_helper  # noqa: PLC0415

        return numpy_helper.to_array(t).reshape(shape)

    return Initializer(t.name, dtype, shape, load)


def _external(model: OnnxModel, t, dtype: str, shape: tuple[int, ...], nbytes: int) -> Initializer:
    """External data: THREATS 16 (absolute paths, `..`, symlinks out of the model's folder)."""
    path = model.path
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    what = f"{path}: initializer {t.name!r} external data {loc!r}"
    if not loc or "\x00" in loc:
        raise ModelFormatError(f"{what}: no file named")
    if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        raise ModelFormatError(f"{what}: an absolute path; external data must lie in the model's folder")
    parts = loc.replace("\\", "/").split("/")
    if ".." in parts:
        raise ModelFormatError(f"{what}: '..' leaves the model's folder")
    root = path.parent.resolve()
    target = (root / loc).resolve()
    if root not in target.parents:
        raise ModelFormatError(f"{what}: resolves outside the model's folder (a symlink out?)")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelFormatError(f"{what}: offset/length are not integers") from None
    try:
        fsize = target.stat().st_size
    except OSError as err:
        raise ModelFormatError(f"{what}: cannot read ({err.strerror})") from None
    if length is not None and length != nbytes:
        raise ModelFormatError(f"{what}: length {length}, shape {list(shape)} x {dtype} needs {nbytes}")
    if not 0 <= offset <= fsize or nbytes > fsize - offset:
        raise ModelFormatError(f"{what}: bytes [{offset}, {offset + nbytes}) lie outside the {fsize}-byte file (truncated?)")

    def load():
        from ..runtime.dtypes import numpy_dtype  # noqa: PLC0415

        with open(target, "rb") as f:
            f.seek(offset)
            raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise ModelFormatError(f"{what}: the file ended early (truncated?)")
        np_dtype = np.bool_ if dtype == "bool" else numpy_dtype(dtype)
        return np.frombuffer(raw, dtype=np_dtype).reshape(shape)

    return Initializer(t.name, dtype, shape, load, external=True)

"""kiln's converters for ONNX operators, tried before TVM's (frontends/onnx_graph.py
subclasses TVM's importer: a converter here returns None to leave the node to TVM's).

Range: TVM 0.27 computes every non-constant Range's length as a tensor and
turns it back into a new symbolic dimension (`tensor_to_shape` + `match_cast`),
so `x + Range(0, Shape(x)[1], 1)` adds a [b, s] and a [range_len] tensor whose
broadcast shape is unknown, and legalization fails ("emit_te now only supports
Tensor that has ShapeExpr shape"). When the bounds are dimensions (PrimValues,
as TVM's Gather makes of `Shape(x)[i]`) or constants, kiln emits `arange` over
them directly: its length is then `s`, the same symbol as x's dimension.

Cast: see convert_cast.
"""

from __future__ import annotations

from collections.abc import Callable


def _scalar(t, x):
    """A PrimExpr for a constant or a PrimValue / PrimExpr input; None for a tensor computed at run time."""
    if x is None:
        return None
    if t.tvm.ir.is_prim_expr(x):  # TVM 0.27: a PrimValue is the PrimExpr itself
        return x
    if isinstance(x, t.tvm.ir.GenericConst):
        v = x.value.numpy()
        if v.size == 1 and v.dtype.kind in "iu":
            return t.tvm.tirx.IntImm("int64", int(v.reshape(-1)[0]))
    return None


def _dtype(v) -> str:
    return str(getattr(v, "dtype", None) or v.ty)  # TVM 0.27 PrimExprs carry their dtype as `ty`


def convert_range(t, bb, inputs, attrs):
    start, limit, delta = (_scalar(t, x) for x in inputs[:3])
    if start is None or limit is None or delta is None:
        return None
    if any(_dtype(v) not in ("int64", "int32") for v in (start, limit, delta)):
        return None
    dtype = "int32" if all(_dtype(v) == "int32" for v in (start, limit, delta)) else "int64"
    if not isinstance(delta, t.tvm.tirx.IntImm) or int(delta) == 0:
        return None  # the length needs the sign of delta: leave it to TVM's converter
    i64 = lambda v: v if _dtype(v) == "int64" else t.tvm.tirx.Cast("int64", v)  # noqa: E731
    return t.relax.op.arange(i64(start), i64(limit), i64(delta), dtype=dtype)


def convert_cast(t, bb, inputs, attrs):
    """Cast of a shape (Shape -> Cast(int32) -> Slice -> Cast(int64) -> Concat -> Reshape: Paddle's exports)
    to an integer type keeps it a shape: TVM's converter makes it a tensor, and the Reshape
    at the end of the chain then has no shape to reshape to."""
    if isinstance(inputs[0], t.relax.ShapeExpr) and attrs.get("to") in (6, 7):  # INT32, INT64
        return inputs[0]
    return None


CONVERTERS: dict[str, Callable] = {"Range": convert_range, "Cast": convert_cast}

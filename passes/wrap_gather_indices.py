"""WrapGatherIndices: every index a gather or scatter reads is kept inside the tensor.

TVM's ONNX importer emits `take` in fast mode for Gather (no bounds check), and
TOPI's gather_elements / gather_nd / scatter_elements / scatter_nd index the
data with the index values as they come (scatter_elements adds the axis length
to a negative index, nothing more). An ONNX model's index inputs come from
whoever calls it (token ids, class ids, positions), so an index out of range
must not read -- or, for the scatters, write -- outside memory. Each index is
taken modulo the length of the axis it indexes: ONNX's own meaning for the
negative indices it allows (-1 is the last), and a defined if meaningless place
for any other (onnxruntime refuses such an index). `take` becomes mode "wrap";
the others get their indices through one floormod (by a constant, or by the
data's symbolic axis lengths): one integer op per index.
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .relax_mutation import rewrite_functions


def _mutator_class():
    t = compiler()
    relax, tir = t.relax, t.tvm.tirx if hasattr(t.tvm, "tirx") else t.tvm.tir
    ops = {name: t.tvm.ir.Op.get(f"relax.{name}") for name in ("take", "gather_elements", "gather_nd", "scatter_elements", "scatter_nd")}

    def lengths(data, axes, dtype):
        """The data's lengths along `axes` as a 1-D tensor of the indices' dtype (a constant where all are known)."""
        dims = [data.ty.shape.values[a] for a in axes]
        if all(isinstance(d, tir.IntImm) for d in dims):
            import numpy as np  # noqa: PLC0415

            return relax.const(np.array([int(d) for d in dims], dtype=dtype), dtype)
        return relax.op.astype(relax.op.shape_to_tensor(relax.ShapeExpr(dims)), dtype)

    def wrapped(indices, data, axes, last_axis: bool):
        """indices mod the axis lengths: one axis for all (elements), or one per last-axis component (nd)."""
        n = lengths(data, axes, str(indices.ty.dtype))
        if not last_axis:
            n = relax.op.reshape(n, [])
        return relax.op.floor_mod(indices, n)

    @relax.expr_functor.mutator
    class _Wrap(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            op, args = call.op, call.args
            if op.same_as(ops["take"]) and call.attrs.mode == "fast":
                axis = call.attrs.axis
                return relax.op.take(args[0], args[1], axis=None if axis is None else int(axis), mode="wrap")
            data = args[0] if len(args) else None
            if data is None or not isinstance(getattr(data, "ty", None), relax.TensorType) or data.ty.shape is None:
                return call
            ndim = data.ty.ndim
            if op.same_as(ops["gather_elements"]) or op.same_as(ops["scatter_elements"]):
                axis = int(call.attrs.axis) % ndim
                idx = self.builder_.emit(wrapped(args[1], data, [axis], False))
                if op.same_as(ops["gather_elements"]):
                    return relax.op.gather_elements(data, idx, axis=axis)
                return relax.op.scatter_elements(data, idx, args[2], axis=axis, reduction=call.attrs.reduction)
            if op.same_as(ops["gather_nd"]) or op.same_as(ops["scatter_nd"]):
                k = args[1].ty.shape.values if isinstance(args[1].ty, relax.TensorType) and args[1].ty.shape is not None else None
                if k is None or not isinstance(k[-1], tir.IntImm):
                    return call
                first = int(call.attrs.batch_dims) if op.same_as(ops["gather_nd"]) else 0
                idx = self.builder_.emit(wrapped(args[1], data, list(range(first, first + int(k[-1]))), True))
                if op.same_as(ops["gather_nd"]):
                    return relax.op.gather_nd(data, idx, batch_dims=first)
                return relax.op.scatter_nd(data, idx, args[2], reduction=call.attrs.reduction)
            return call

    return _Wrap


class WrapGatherIndices:
    """Module pass over every Relax function."""

    def __call__(self, mod):
        return rewrite_functions(_mutator_class()(mod), mod)

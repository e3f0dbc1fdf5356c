"""WrapGatherIndices: `take` with mode "fast" (no bounds check: an index out
of range reads or crashes outside the tensor) becomes mode "wrap".

TVM's ONNX importer emits `take` in fast mode for Gather. An ONNX model's
index inputs come from whoever calls it (token ids, class ids), so an out-of-
range index must not read outside memory. "wrap" is ONNX's own semantics for
negative indices (-1 is the last), and it keeps any other index inside the
tensor (onnxruntime refuses such an index; kiln's result is then defined but
meaningless). The modulo costs one integer op per gathered row.
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .relax_mutation import rewrite_functions


def _mutator_class():
    t = compiler()
    relax = t.relax
    take = t.tvm.ir.Op.get("relax.take")

    @relax.expr_functor.mutator
    class _Wrap(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.same_as(take) and call.attrs.mode == "fast":
                axis = call.attrs.axis
                return relax.op.take(call.args[0], call.args[1], axis=None if axis is None else int(axis), mode="wrap")
            return call

    return _Wrap


class WrapGatherIndices:
    """Module pass over every Relax function."""

    def __call__(self, mod):
        return rewrite_functions(_mutator_class()(mod), mod)

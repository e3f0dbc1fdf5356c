"""SoftmaxOnKernel: a float32 softmax over the last axis calls kiln's C row softmax
(kernels/cpu/softmax.c) -- CPU graphs (compiler/onnx_build.py), before FastMathTransform.

    y = softmax(x [..., L], axis=-1)   =>   y = kiln_softmax_rows(x [R, L]) viewed [..., L]

Why: Relax's fast_softmax as TVM loops computed exp twice per value with scalar sums even after
CpuRowwise's vector partials: BERT-base's 12 attention softmaxes (12 x 128 x 128) took 0.7-1.2 ms
each; the C kernel stores exp once and reads each row three times, 8 lanes at a time
(benchmarks/NOTES.md, Session 20). Other axes keep Relax's softmax.
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .kernels.sgemm_cpu import softmax_rows
from .relax_mutation import rewrite_functions


def _mutator_class():
    t = compiler()
    relax = t.relax
    softmax = t.tvm.ir.Op.get("relax.nn.softmax")

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.kernel = None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(softmax):
                return call
            x = call.args[0]
            ty = x.ty
            if not (isinstance(ty, relax.TensorType) and ty.shape is not None and ty.ndim >= 1 and str(ty.dtype) == "float32"):
                return call
            if int(call.attrs.axis) not in (-1, ty.ndim - 1):
                return call
            *lead, n = ty.shape.values
            rows = t.tirx.IntImm("int64", 1)
            for d in lead:
                rows = rows * d
            bld = self.builder_
            if self.kernel is None:
                self.kernel = bld.add_func(softmax_rows().with_attr("global_symbol", "kiln_softmax_rows"), "kiln_softmax_rows")
            x2 = bld.emit(relax.op.reshape(x, [rows, n]))
            y = bld.emit(relax.call_tir(self.kernel, [x2], relax.TensorType([rows, n], "float32")))
            return relax.op.reshape(y, list(ty.shape.values))

    return _Rewrite


class SoftmaxOnKernel:
    """Module pass over every Relax function (CPU graphs: compiler/onnx_build.py)."""

    def __call__(self, mod):
        return rewrite_functions(_mutator_class()(mod), mod)


__all__ = ["SoftmaxOnKernel"]

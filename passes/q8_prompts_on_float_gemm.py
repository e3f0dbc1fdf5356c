"""Q8PromptsOnFloatGemm: a q8 matmul of a graph whose fewest rows are many (a static prompt or
image) decodes its weights panel by panel into kiln's float GEMM (kernels/cpu/sgemm.c,
kiln_cpu_sgemm_q8) instead of the integer dots (kernels/cpu/qdot.c) -- CPU graphs without VNNI
(compiler/onnx_build.py), after QuantizeGraphWeights, before the pipeline's CpuQuantMatmul.

    NT_qmatmul_q8(x [A, S, K], q, s)   =>   kiln_sgemm_q8(x, q, s)      when A * S >= MIN_ROWS for every value of its symbols

Why: on AVX2 without VNNI the integer dot's multiply chain (vpmaddwd for q8's int16 activations,
vpmaddubsw + vpmaddwd for int8) peaks at the FMA's MAC rate, so at prompt sizes the float GEMM on
decoded weights is faster (768x768 at 128 rows: qdot 1.37-1.50 ms, this 1.17-1.29, fp32 1.08-1.30,
one interleaved run) while the weights' bytes stay a quarter; few rows keep the integer dots (2.8x
the float GEMM at one row: bytes bound that time). benchmarks/NOTES.md, Session 20.
"""

from __future__ import annotations

from ..frontends.models.layers import OP_ATTR, QFORMAT_ATTR
from ..tvm_compat import compiler
from .kernels.sgemm_cpu import sgemm_q8
from .quantize_graph_weights import _fewest
from .relax_mutation import rewrite_functions

MIN_ROWS = 16


def _mutator_class():
    t = compiler()
    relax = t.relax
    call_tir = t.tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod
            self.kernels: dict = {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir):
                return call
            func = self.mod_[call.args[0]]
            attrs = func.attrs if isinstance(func, t.tirx.PrimFunc) and func.attrs is not None else {}
            if str(attrs.get(OP_ATTR, "")) != "qmatmul" or str(attrs.get(QFORMAT_ATTR, "")) != "q8":
                return call
            args = list(call.args[1].fields)
            if len(args) != 3:
                return call
            x, q = args[0], args[1]
            if not (isinstance(x.ty, relax.TensorType) and x.ty.shape is not None and x.ty.ndim == 3 and str(x.ty.dtype) == "float32"):
                return call
            rows = _fewest(t, x.ty.shape.values[:2])
            try:
                n, k = (int(d) for d in q.ty.shape.values)
            except TypeError:
                return call
            if rows is None or rows < MIN_ROWS or k % 32:
                return call
            if (k, n) not in self.kernels:
                name = f"kiln_sgemm_q8_{n}x{k}"
                self.kernels[(k, n)] = self.builder_.add_func(sgemm_q8(k, n).with_attr("global_symbol", name), name)
            return relax.call_tir(self.kernels[(k, n)], args, call.ty)

    return _Rewrite


class Q8PromptsOnFloatGemm:
    """Module pass over every Relax function (CPU graphs: compiler/onnx_build.py)."""

    def __call__(self, mod):
        return rewrite_functions(_mutator_class()(mod), mod)


__all__ = ["Q8PromptsOnFloatGemm", "MIN_ROWS"]

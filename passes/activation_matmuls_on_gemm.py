"""ActivationMatmulsOnGemm: matmuls of two activations (attention's q k^T and p v in BERT-like
graphs) call kiln's C GEMM (kernels/cpu/sgemm.c, kiln_cpu_sgemm_batched), which packs the right
operand into its panels per call -- CPU graphs (compiler/onnx_build.py), after PackGraphWeights
has taken the matmuls of weights.

    y = matmul(a [..., M, K], b [..., K, N])   =>   y = kiln_sgemm_batched(a [B, M, K], b [B or 1, K, N]) viewed [..., M, N]

Taken: float32 operands and result, both of rank >= 2, b's leading dims equal to a's or all 1
(no other broadcasting). Why: TVM's loops for these (CpuSpatialReduction) ran BERT-base's 24
attention products at ~50 GFLOP/s, ~11 ms of a run (benchmarks/NOTES.md, Session 20).
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .kernels.sgemm_cpu import sgemm_batched
from .relax_mutation import rewrite_functions


def _mutator_class():
    t = compiler()
    relax = t.relax
    matmul = t.tvm.ir.Op.get("relax.matmul")
    analyzer = t.tvm.sym.Analyzer()

    def prod(dims):
        out = t.tirx.IntImm("int64", 1)
        for d in dims:
            out = out * d
        return out

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.kernel = None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(matmul):
                return call
            a, b = call.args
            tys = [a.ty, b.ty, call.ty]
            if not all(isinstance(s, relax.TensorType) and s.shape is not None and s.ndim >= 2 and str(s.dtype) == "float32" for s in tys):
                return call
            (*lead, m, k), (*blead, _, n) = a.ty.shape.values, b.ty.shape.values
            if all(isinstance(d, t.tirx.IntImm) and int(d) == 1 for d in blead):
                bb = 1
            elif len(blead) == len(lead) and all(analyzer.can_prove_equal(x, y) for x, y in zip(lead, blead)):
                bb = prod(blead)
            else:
                return call
            batch = prod(lead)
            bld = self.builder_
            if self.kernel is None:
                self.kernel = bld.add_func(sgemm_batched().with_attr("global_symbol", "kiln_sgemm_batched"), "kiln_sgemm_batched")
            a3 = bld.emit(relax.op.reshape(a, [batch, m, k]))
            b3 = bld.emit(relax.op.reshape(b, [bb, k, n]))
            y = bld.emit(relax.call_tir(self.kernel, [a3, b3], relax.TensorType([batch, m, n], "float32")))
            return relax.op.reshape(y, [*lead, m, n])

    return _Rewrite


class ActivationMatmulsOnGemm:
    """Module pass over every Relax function (CPU graphs: compiler/onnx_build.py)."""

    def __call__(self, mod):
        return rewrite_functions(_mutator_class()(mod), mod)


__all__ = ["ActivationMatmulsOnGemm"]

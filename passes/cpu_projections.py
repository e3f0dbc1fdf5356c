"""CPU quantized projections on integer dot products (kernels/qdot_cpu.py over kernels/cpu/qdot.c).

Runs on the Relax graph before legalization, like CudaProjections: the projections are calls of
kiln's TE kernels that the model marked (frontends/models/layers.py OP_ATTR "qmatmul", ROLE_ATTR
"projection" | "lm_head", QFORMAT_ATTR the weight format). A call is replaced when its activations
and output are float32 (kiln's CPU compute dtype), its rows are [A, S, K] and its format and
shape fit the kernel (qdot_supported); everything else keeps the TE kernel and the CPU schedules.

    NT_qmatmul(x [A, S, K] f32, q, s[, z]) -> f32   =>   kiln_qdot_<kind>(x, q, s[, z])

Activations are quantized to int8 per 32 values inside the kernel (llama.cpp's Q8 activations):
quality is measured end to end by the compile-time gate and tests/test_quant_quality.py.
"""

from __future__ import annotations

from ..frontends.models.layers import OP_ATTR, QFORMAT_ATTR, ROLE_ATTR
from ..tvm_compat import compiler
from .cuda_projections import _is_op, _static_shape
from .kernels.qdot_cpu import QDOT_KINDS, qdot, qdot_supported
from .relax_mutation import rewrite_functions

_t = compiler()
relax = _t.relax
tirx = _t.tirx


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod_ = mod
        self.cache: dict = {}

    def _match(self, call):
        """call_tir(<qmatmul projection | lm_head>, (x [A, S, K] f32, q, s[, z])) -> f32, a format and shape
        the kernel takes -> (K, N, group, kind), else None."""
        if not _is_op(call, "relax.call_tir"):
            return None
        func = self.mod_[call.args[0]]
        attrs = func.attrs if isinstance(func, tirx.PrimFunc) and func.attrs is not None else {}
        if str(attrs.get(OP_ATTR, "")) != "qmatmul" or str(attrs.get(ROLE_ATTR, "")) not in ("projection", "lm_head"):
            return None
        fmt = str(attrs.get(QFORMAT_ATTR, ""))
        kind = QDOT_KINDS.get(fmt)
        args = list(call.args[1].fields)
        if kind is None or len(args) != {"q8": 3, "q4": 4, "q4k": 6}[kind]:
            return None
        x = args[0]
        shape = x.ty.shape.values if isinstance(x.ty, relax.TensorType) and x.ty.shape is not None else None
        sq, ss = _static_shape(args[1]), _static_shape(args[2])
        if shape is None or len(shape) != 3 or sq is None or ss is None or len(sq) != 2 or len(ss) != 2:
            return None
        if str(x.ty.dtype) != "float32" or str(call.ty.dtype) != "float32":
            return None
        try:
            K = int(shape[2])
        except TypeError:
            return None
        N = sq[0]
        if ss[1] == 0 or K % ss[1]:
            return None
        group = K // ss[1]
        if kind == "q4k":  # the kernel's block: the super-block, from the super-block scales' shape
            sd = _static_shape(args[4])
            if group != 32 or sd is None or len(sd) != 2 or sd[1] == 0 or K % sd[1]:
                return None
            group = K // sd[1]
        if not qdot_supported(fmt, K, group):
            return None
        return K, N, group, kind

    def visit_call_(self, call):
        call = super().visit_call_(call)
        hit = self._match(call)
        if hit is None:
            return call
        K, N, group, kind = hit
        key = (kind, K, N, group)
        if key not in self.cache:
            name = f"kiln_qdot_{kind}g{group}_{N}x{K}"
            self.cache[key] = self.builder_.add_func(qdot(K, N, group, kind).with_attr("global_symbol", name), name)
        return relax.call_tir(self.cache[key], list(call.args[1].fields), call.ty)

    def run(self):
        return rewrite_functions(self, self.mod_)


@_t.tvm.transform.module_pass(opt_level=0, name="kiln.CpuQuantMatmul")
class CpuQuantMatmul:
    """See the module docstring. CPU targets only (the pipeline decides)."""

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod).run()


__all__ = ["CpuQuantMatmul"]

"""The quality gate's CPU stand-in for Hopper's fp8 tensor cores: where a CUDA target of the compile runs e4m3
projections on fp8 wgmma (kernels/cuda/gemm_wg.cuh quant_rows_e4m3 + gemm_ws_f8: prompts and batches, K % 128 == 0),
the gate's CPU variant rounds those projections' input rows the same way first, so the KLD it reports includes what
the GPU artifact rounds, not only the weights.

    NT_qmatmul(x [A, S, K], q, s)   (QFORMAT fp8, K % 128 == 0)   =>   NT_qmatmul(e4m3_rows(x), q, s)

e4m3_rows: per row (token), scale = max |x| / 448; x / scale rounded to the nearest e4m3 value (ties to even,
subnormals kept, saturating at 448 -- cvt.rn.satfinite's rounding), times scale. The CPU variant is only ever
built for the gate (PipelineOptions.emulate_fp8_act); no shipped artifact holds this pass's output.
"""

from __future__ import annotations

from ..frontends.models.layers import OP_ATTR, QFORMAT_ATTR, ROLE_ATTR
from ..tvm_compat import compiler
from .kernels.gemm_cuda import f8_wgmma_supported
from .relax_mutation import call_tir_attrs, rewrite_functions

_t = compiler()
relax = _t.relax
te = _t.te
tirx = _t.tirx

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6


def e4m3_round(v):
    """float32 v with |v| <= 448 -> the nearest e4m3 value (ties to even; the subnormal grid 2^-9 below 2^-6), as float32."""
    u32 = lambda c: tirx.const(c, "uint32")  # noqa: E731
    av = tirx.abs(v)
    bits = tirx.reinterpret("uint32", av)
    # drop 20 of float32's 23 mantissa bits, rounding to nearest, ties to even (e4m3 keeps 3)
    normal = tirx.reinterpret("float32", tirx.bitwise_and(bits + u32(0x7FFFF) + tirx.bitwise_and(tirx.shift_right(bits, u32(20)), u32(1)),
                                                          u32(0xFFF00000)))
    sub = tirx.nearbyint(av * tirx.const(512.0, "float32")) * tirx.const(1.0 / 512, "float32")
    r = tirx.min(tirx.Select(av < tirx.const(E4M3_MIN_NORMAL, "float32"), sub, normal), tirx.const(E4M3_MAX, "float32"))
    return tirx.Select(v < tirx.const(0.0, "float32"), -r, r)


def e4m3_rows(x):
    """TE: x [..., K] -> x with each row rounded to e4m3 under one scale per row (max |x| / 448), back in x's dtype."""
    *lead, K = x.shape
    k = te.reduce_axis((0, K), name="k")
    amax = te.compute(lead, lambda *i: te.max(tirx.abs(x(*i, k).astype("float32")), axis=k), name="fp8_amax")

    def quant(*idx):
        m = amax(*idx[:-1])
        inv = tirx.Select(m > tirx.const(0.0, "float32"), tirx.const(E4M3_MAX, "float32") / m, tirx.const(0.0, "float32"))
        q = e4m3_round(x(*idx).astype("float32") * inv)
        return (q * (m / tirx.const(E4M3_MAX, "float32"))).astype(x.dtype)

    return te.compute(x.shape, quant, name="fp8_act_rows")


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call):
        call = super().visit_call_(call)
        attrs = call_tir_attrs(self.mod_, call)
        if (str(attrs.get(OP_ATTR, "")), str(attrs.get(ROLE_ATTR, "")), str(attrs.get(QFORMAT_ATTR, ""))) != ("qmatmul", "projection", "fp8"):
            return call
        args = list(call.args[1].fields)
        shape = args[0].ty.shape.values if isinstance(args[0].ty, relax.TensorType) and args[0].ty.shape is not None else None
        try:
            K = int(shape[-1])
        except (TypeError, IndexError):
            return call
        if not f8_wgmma_supported(K):  # the GPU's condition for its fp8 kernels
            return call
        x = self.builder_.emit(self.builder_.call_te(e4m3_rows, args[0], primfunc_name_hint="fp8_act_rows"), "fp8_act")
        return relax.call_tir(call.args[0], [x, *args[1:]], call.ty)

    def run(self):
        return rewrite_functions(self, self.mod_)


@_t.tvm.transform.module_pass(opt_level=0, name="kiln.EmulateFp8Activations")
class EmulateFp8Activations:
    """See the module docstring. The quality gate's CPU variant only (PipelineOptions.emulate_fp8_act)."""

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod).run()


__all__ = ["EmulateFp8Activations", "e4m3_rows"]

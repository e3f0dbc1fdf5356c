"""MaxPoolOnKernel: a float32 2-D max pool over NHWC activations (what ConvAsGemm's layout change
leaves around convolutions) calls kiln's C kernel (kernels/cpu/max_pool.c) -- CPU graphs
(compiler/onnx_build.py).

    y = max_pool2d(x [B, H, W, C], layout NHWC)   =>   y = kiln_max_pool2d(x) [B, OH, OW, C]

Why: TVM's loops for it took 0.5 ms of ResNet-50's run (its stem pool, 112 x 112 x 64, 3 x 3
stride 2); the C kernel takes each output pixel's channels eight at a time over the window's
taps inside x (benchmarks/NOTES.md). The output shape is the op's own (ceil_mode, trailing
pads); other layouts, dtypes and windows of more than 64 taps keep Relax's op.
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .kernels.pool_cpu import MAX_TAPS, max_pool2d_nhwc
from .relax_mutation import rewrite_functions


def _mutator_class():
    t = compiler()
    relax = t.relax
    max_pool = t.tvm.ir.Op.get("relax.nn.max_pool2d")

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.kernels = {}  # geometry -> GlobalVar

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(max_pool):
                return call
            a = call.attrs
            x, out = call.args[0].ty, call.ty
            if str(a.layout) != "NHWC" or str(a.out_layout) != "NHWC":
                return call
            if not all(isinstance(ty, relax.TensorType) and ty.shape is not None and ty.ndim == 4 and str(ty.dtype) == "float32"
                       for ty in (x, out)):
                return call
            (kh, kw), (sh, sw), (dh, dw) = ([int(v) for v in a.pool_size], [int(v) for v in a.strides],
                                            [int(v) for v in a.dilation])
            pt, pl = int(a.padding[0]), int(a.padding[1])
            if kh * kw > MAX_TAPS:
                return call
            geom = (kh, kw, sh, sw, pt, pl, dh, dw)
            if geom not in self.kernels:
                name = "kiln_max_pool2d_" + "_".join(map(str, geom))
                self.kernels[geom] = self.builder_.add_func(max_pool2d_nhwc(*geom).with_attr("global_symbol", name), name)
            return relax.call_tir(self.kernels[geom], [call.args[0]], relax.TensorType(out.shape, "float32"))

    return _Rewrite


class MaxPoolOnKernel:
    """Module pass over every Relax function (CPU graphs: compiler/onnx_build.py)."""

    def __call__(self, mod):
        return rewrite_functions(_mutator_class()(mod), mod)


__all__ = ["MaxPoolOnKernel"]

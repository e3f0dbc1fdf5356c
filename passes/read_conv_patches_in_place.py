"""ReadConvPatchesInPlace: a convolution that ConvAsGemm made an im2col and PackGraphWeights put on
kiln's packed GEMM becomes one call that reads its patches in place -- CPU graphs
(compiler/onnx_build.py), after PackGraphWeights.

    patches = kiln_im2col(x)                      # x [B, H, W, C] NHWC -> [B, OH, OW, KH, KW, C]
    y = kiln_sgemm(reshape(patches, [M, K]), P)   # P [N/16, K, 16]
  =>
    y = reshape(kiln_sconv(x, P), [M, N])         # kernels/cpu/sgemm.c: kiln_cpu_sconv_packed

The micro-kernel's six row pointers walk x itself, one per (output pixel, tap), or a row of zeros
where the tap falls in the padding (XNNPACK's indirection); the packed weight and its K order
(kh, kw, c) stay as they are. Taken: im2col calls whose PrimFunc carries conv_as_gemm.PATCHES_ATTR
(static H, W, C) with C >= 16 -- below that a tap's run of channels is too short for the
micro-kernel's k loop, so there x is padded and a row of KW pixels becomes one tap of KW C floats
(ResNet's stem: C 3, 7 x 7, taps of 21; where KW C < 16 or the width is dilated, im2col stays). Why: ResNet-50's im2col copies wrote
~4.5 ms of patches per run, read back once by the GEMM (benchmarks/NOTES.md, Session 21).
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .conv_as_gemm import PATCHES_ATTR
from .kernels.sgemm_cpu import PACKED_GEMM_ATTR, sconv_packed
from .relax_mutation import bindings, drop_unreferenced, func_attr

MIN_CHANNELS = 16  # a tap's channels: the k-run the micro-kernel reads from one pointer


def _mutator_class():
    t = compiler()
    relax = t.relax
    call_tir = t.tvm.ir.Op.get("relax.call_tir")
    reshape = t.tvm.ir.Op.get("relax.reshape")

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod, self.bound, self.kernels = mod, {}, {}

        def _callee(self, call):
            """The PrimFunc a call_tir calls, else None."""
            if not (isinstance(call, relax.Call) and call.op.same_as(call_tir)):
                return None
            f = self.mod[call.args[0]]
            return f if isinstance(f, t.tirx.PrimFunc) else None

        def visit_call_(self, call):
            gemm = self._callee(call)
            if gemm is None or func_attr(gemm, PACKED_GEMM_ATTR) is None or int(func_attr(gemm, PACKED_GEMM_ATTR)[2]) != 0:
                return super().visit_call_(call)
            col, panels = call.args[1].fields
            view = self.bound.get(col)
            patches = view.args[0] if isinstance(view, relax.Call) and view.op.same_as(reshape) else None
            im2col = self.bound.get(patches)
            geom = func_attr(self._callee(im2col), PATCHES_ATTR) if self._callee(im2col) is not None else None
            if geom is None:
                return super().visit_call_(call)
            g = {k: int(v) for k, v in geom.items()}
            fold = g["C"] < MIN_CHANNELS and g["KW"] * g["C"] >= MIN_CHANNELS and g["dw"] == 1
            if g["C"] < MIN_CHANNELS and not fold:
                return super().visit_call_(call)
            x = self.visit_expr(im2col.args[1].fields[0])
            m, n = call.ty.shape.values
            if fold:  # x padded, then a row of KW pixels is one tap of KW C contiguous floats
                pb = max(0, (g["OH"] - 1) * g["sh"] + (g["KH"] - 1) * g["dh"] + 1 - g["H"] - g["ph"])
                pr = max(0, (g["OW"] - 1) * g["sw"] + g["KW"] - g["W"] - g["pw"])
                if g["ph"] or g["pw"] or pb or pr:
                    x = self.builder_.emit(relax.op.nn.pad(x, [0, 0, g["ph"], pb, g["pw"], pr, 0, 0]))
                g = {**g, "H": g["H"] + g["ph"] + pb, "W": g["W"] + g["pw"] + pr, "XC": g["C"], "C": g["KW"] * g["C"], "KW": 1,
                     "ph": 0, "pw": 0}
            key = (tuple(sorted(g.items())), int(n))
            if key not in self.kernels:
                name = f"kiln_sconv_{int(n)}x{g['KH']}x{g['KW']}x{g['C']}_{g['H']}x{g['W']}_s{g['sh']}"
                self.kernels[key] = self.builder_.add_func(sconv_packed(g, int(n)).with_attr("global_symbol", name), name)
            b = x.ty.shape.values[0]
            y = self.builder_.emit(relax.call_tir(self.kernels[key], [x, self.visit_expr(panels)],
                                                  relax.TensorType([b, g["OH"], g["OW"], n], "float32")))
            return relax.op.reshape(y, [m, n])

    return _Rewrite


class ReadConvPatchesInPlace:
    """Module pass over every Relax function (CPU graphs: compiler/onnx_build.py)."""

    def __call__(self, mod):
        relax = compiler().relax
        rw = _mutator_class()(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rw.bound = bindings(func)
                new = rw.visit_expr(func)
                rw.builder_.update_func(gv, relax.analysis.remove_all_unused(new))  # the im2col calls left unread
        return drop_unreferenced(drop_unreferenced(rw.builder_.get(), PATCHES_ATTR), PACKED_GEMM_ATTR)


__all__ = ["ReadConvPatchesInPlace"]

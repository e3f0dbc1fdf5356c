"""ConvAsGemm: 2-D convolutions (one group) become an explicit im2col and a GEMM,
in NHWC, for the CPU (issue 18).

    x' = NHWC x (Relax's ConvertLayout: activations around convolutions in NHWC, the
         weights stay OIHW params, so no weight is transposed per call)
    y  = conv2d(x', w)  =>  col = im2col(x')                                  # [N OH OW, KH KW C]
                            y   = reshape(matmul(col, reshape(permute(w, OHWI), [O, KH KW C])^T), [N, OH, OW, O])

Why: TVM's convolution loops, even under passes/cpu_graph_rules.py's
CpuSpatialReduction (one output row accumulated per reduction pass), ran
ResNet-50 at 4.9x onnxruntime's time on this 2-vCPU box; kiln's GEMM
(cpu_rules.CpuMatmul, a BLIS-style register-tiled micro-kernel with packed
weights) is its fastest CPU kernel, and a convolution is a GEMM over the
patches: 272 -> 124 ms (benchmarks: BENCHMARKS.md). The GEMM's rows are the
output pixels in NHWC order, so nothing is transposed back (NCHW with a
transpose after each GEMM measured ~20% slower). im2col is an opaque call
(op_pattern 8: never fused into the GEMM, whose micro-kernel would recompute
the patch indices per element) writing [N, OH, OW, KH, KW, C] with no
division in its indices (C innermost: vectorised copies of one tap's channels); a 1x1 stride-1 unpadded convolution skips it (the
NHWC input is its own patch matrix). The weight reshape is a view
(RewriteDataflowReshape). Grouped / depthwise convolutions and 1-D / 3-D ones
keep the convolution. On the packed C GEMM, ReadConvPatchesInPlace later replaces im2col + GEMM
by one kernel that reads the patches from x in place (the im2col here stays the form the weight
passes match, and the fallback: dynamic H / W, C < 16, q8).
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .relax_mutation import rewrite_functions

# the im2col PrimFunc's geometry (static H, W, C, OH, OW, KH, KW, strides sh sw, leading pads ph pw,
# dilations dh dw): passes/read_conv_patches_in_place.py replaces im2col + packed GEMM by one call from it
PATCHES_ATTR = "kiln.conv_patches"


def _im2col(t, c_, h_, w_, kh_, kw_, oh_, ow_, stride, pad, dil):
    """The patches of an NHWC x as [N, OH, OW, KH, KW, C] (the caller reshapes to [N OH OW, KH KW C],
    a view): no division in the indices, the writes contiguous, and the innermost loop runs along
    C, contiguous in x too (one tap's channels), so CpuInlineElementwise vectorises it and runs the
    outer loops in parallel (with C innermost of the (c, kh, kw) order it had a 3-long inner loop
    and stayed serial: ~6 ms of ResNet-50, session 20)."""
    te, tir = t.tvm.te, t.tirx

    def fn(x):
        def at(n, oh, ow, kh, kw, c):  # k in (kh, kw, c) order: the weight is permuted to OHWI to match
            ih = oh * stride[0] - pad[0] + kh * dil[0]
            iw = ow * stride[1] - pad[1] + kw * dil[1]
            inside = tir.all(ih >= 0, ih < h_, iw >= 0, iw < w_)
            ihc, iwc = tir.max(tir.min(ih, h_ - 1), 0), tir.max(tir.min(iw, w_ - 1), 0)
            return tir.if_then_else(inside, x[n, ihc, iwc, c], tir.const(0, x.dtype))

        return te.compute((x.shape[0], oh_, ow_, kh_, kw_, c_), at, name="im2col")

    return fn


def _mutator_class():
    t = compiler()
    relax = t.relax
    conv2d = t.tvm.ir.Op.get("relax.nn.conv2d")

    @relax.expr_functor.mutator
    class _Conv(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(conv2d):
                return call
            a = call.attrs
            if a.data_layout != "NHWC" or a.kernel_layout != "OIHW" or a.out_layout not in ("NHWC", "") or int(a.groups) != 1:
                return call
            x, w = call.args
            xs, ws, ys = x.ty, w.ty, call.ty
            if not all(isinstance(s, relax.TensorType) and s.shape is not None and s.ndim == 4 for s in (xs, ws, ys)):
                return call
            if xs.dtype != ws.dtype or ys.dtype != xs.dtype or xs.dtype not in ("float32", "float16", "bfloat16"):
                return call
            n_, h_, w_, c_ = xs.shape.values
            o_, c2, kh_, kw_ = ws.shape.values
            oh_, ow_ = ys.shape.values[1], ys.shape.values[2]
            if not all(isinstance(v, t.tirx.IntImm) for v in (o_, c2, kh_, kw_)):
                return call  # weights of a fixed shape (they are params or constants)
            pad = [int(p) for p in a.padding]  # top, left, bottom, right
            stride, dil = [int(s) for s in a.strides], [int(d) for d in a.dilation]
            k = int(c2) * int(kh_) * int(kw_)
            if k == int(c2) and stride == [1, 1] and pad == [0, 0, 0, 0]:
                col = self.builder_.emit(relax.op.reshape(x, [n_ * h_ * w_, k]))  # 1x1: the input is its own patch matrix
            else:
                attrs = {"op_pattern": 8}
                if all(isinstance(v, t.tirx.IntImm) for v in (h_, w_, c_, oh_, ow_)):  # ReadConvPatchesInPlace's key
                    attrs[PATCHES_ATTR] = {"H": int(h_), "W": int(w_), "C": int(c_), "OH": int(oh_), "OW": int(ow_), "KH": int(kh_),
                                           "KW": int(kw_), "sh": stride[0], "sw": stride[1], "ph": pad[0], "pw": pad[1],
                                           "dh": dil[0], "dw": dil[1]}
                patches = self.builder_.emit(self.builder_.call_te(
                    _im2col(t, c_, h_, w_, int(kh_), int(kw_), oh_, ow_, stride, pad[:2], dil), x,
                    primfunc_name_hint="kiln_im2col", primfunc_attrs=attrs))
                col = self.builder_.emit(relax.op.reshape(patches, [n_ * oh_ * ow_, k]))
            # the weight's K in the patches' order: OIHW -> OHWI (a view chain the weight passes turn into data)
            w2 = self.builder_.emit(relax.op.reshape(relax.op.permute_dims(w, [0, 2, 3, 1]), [int(o_), k]))
            y2 = self.builder_.emit(relax.op.matmul(col, relax.op.permute_dims(w2, [1, 0])))
            return relax.op.reshape(y2, [n_, oh_, ow_, int(o_)])  # the GEMM's rows: output pixels in NHWC order

    return _Conv


class ConvAsGemm:
    """Module pass over every Relax function (CPU graphs: compiler/onnx_build.py)."""

    def __call__(self, mod):
        t = compiler()
        if not _has_conv2d(t, mod):
            return mod  # ConvertLayout failed on some graphs without any convolution (ops of unknown output shape)
        mod = t.relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OIHW"]})(mod)
        return rewrite_functions(_mutator_class()(mod), mod)  # a new module (with the im2col PrimFuncs)


def _has_conv2d(t, mod) -> bool:
    conv2d = t.tvm.ir.Op.get("relax.nn.conv2d")
    found = []

    @t.relax.expr_functor.visitor
    class _Find(t.relax.PyExprVisitor):
        def visit_call_(self, call):
            if call.op.same_as(conv2d):
                found.append(call)
            super().visit_call_(call)

    for f in mod.functions.values():
        if isinstance(f, t.relax.Function) and not found:
            _Find().visit_expr(f)
    return bool(found)

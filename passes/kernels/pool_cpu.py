"""The call_tir callee of kernels/cpu/max_pool.c (passes/max_pool_on_kernel.py): a 2-D max pool over
NHWC activations, its window geometry fixed at compile time, every size symbolic.

    max_pool2d_nhwc(g)    x  # [B, H, W, C] f32  -> y  # [B, OH, OW, C] f32
"""

from __future__ import annotations

from ...tvm_compat import compiler

_t = compiler()
T = _t.T

MAX_TAPS = 64  # KH KW at most: max_pool.c keeps a window's tap offsets on its stack


def max_pool2d_nhwc(kh: int, kw: int, sh: int, sw: int, pt: int, pl: int, dh: int, dw: int):
    """Window kh x kw, strides sh, sw, leading pads pt (top), pl (left), dilations dh, dw; the trailing
    pads and ceil_mode are in the output size OH, OW the caller gives y. At most MAX_TAPS taps (the
    kernel returns nonzero and writes nothing past them)."""
    assert kh * kw <= MAX_TAPS
    i64 = T.int64

    @T.prim_func(s_tir=True)
    def kiln_max_pool2d(var_x: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        B, H, W, C, OH, OW = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        x = T.match_buffer(var_x, (B, H, W, C), "float32")
        y = T.match_buffer(var_y, (B, OH, OW, C), "float32")
        # a root block, as softmax_rows has: Relax's passes that inspect call_tir callees assert that the body is one
        with T.sblock("root"):
            T.reads(x[0:B, 0:H, 0:W, 0:C])
            T.writes(y[0:B, 0:OH, 0:OW, 0:C])
            T.evaluate(T.call_extern("int32", "kiln_cpu_max_pool2d_nhwc", x.data, y.data, B, H, W, C, OH, OW,
                                     i64(kh), i64(kw), i64(sh), i64(sw), i64(pt), i64(pl), i64(dh), i64(dw)))

    return kiln_max_pool2d

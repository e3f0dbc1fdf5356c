"""fp32 GEMM on weights packed at compile time, for CPU graphs (issue 18): a TIR wrapper around
kernels/cpu/sgemm.c and the packed layout as a weight "format" that passes/pack_graph_weights.py
applies (compiler/cpu_codegen.py compiles the C for each CPU target and links it in).

    sgemm_packed(K, N)    x  # [M, K] f32 (M symbolic), w  # [ceil(N / 16), K, 16] f32  -> y  # [M, N] f32
    sconv_packed(g, N)    x  # [B, H, W, C] f32 NHWC (B symbolic), w  # [ceil(N / 16), KH KW C, 16] f32
                             -> y  # [B, OH, OW, N] f32: the convolution, its patches read in place

The layout: W [N, K] (B transposed, as kiln stores MatMul weights) cut into panels of 16 rows,
each stored k-major ([K, 16]), rows past N zero -- what the micro-kernel reads, 16 floats (two
AVX2 vectors) per k, in order (benchmarks/NOTES.md, Session 20).
"""

from __future__ import annotations

import numpy as np

from ...tvm_compat import compiler

_t = compiler()
T = _t.T

PANEL = 16  # weight rows per panel: sgemm.c's SG_NR
PACKED_GEMM_ATTR = "kiln.packed_gemm"  # sgemm_packed's PrimFunc: [K, N, ep]
PACKED_CONV_ATTR = "kiln.packed_conv"  # sconv_packed's: its geometry, N and ep


class PackedPanels:
    """W [N, K] float32 -> panels [ceil(N / 16), K, 16] float32 (the one array "p"). Has the
    interface passes/quantize_graph_weights.py asks of a weight format, plus `graph_kernel`:
    the callee it emits instead of a TE matmul. Lossless: the same floats, reordered."""

    name = "f32p16"  # the params' layout code in the manifest ("layout"; their quant stays "none")

    def fits(self, k: int) -> bool:
        return k > 0

    def group_for(self, k: int) -> int:
        return k

    def parts(self, shape):
        n, k = shape
        return {"p": (((n + PANEL - 1) // PANEL, k, PANEL), "float32")}

    def quantize(self, w: np.ndarray) -> dict:
        n, k = w.shape
        pad = (-n) % PANEL
        w = np.pad(np.asarray(w, np.float32), ((0, pad), (0, 0)))
        return {"p": np.ascontiguousarray(w.reshape(-1, PANEL, k).transpose(0, 2, 1))}

    def graph_kernel(self, k: int, n: int):
        return sgemm_packed(k, n)


PACKED_PANELS = PackedPanels()


EP_BIAS, EP_RES, EP_RELU = 1, 2, 4  # the epilogue's bits (sgemm.c: bias [N], res [M, N], ReLU after the last K slice)


def sgemm_packed(K: int, N: int, ep: int = 0):
    """The call_tir callee for one packed [N, K] matrix: x [M, K] -> y [M, N]. With an epilogue `ep`
    (EP_* bits, always with EP_BIAS: passes/fuse_gemm_epilogues.py) y = relu?(x W^T + bias [N] (+ res [M, N]))
    and the arguments are (x, w, bias, res if EP_RES, y)."""
    P = (N + PANEL - 1) // PANEL
    attrs = {"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8, PACKED_GEMM_ATTR: [K, N, ep]}  # 8: opaque, never fused
    if ep == 0:
        @T.prim_func
        def kiln_sgemm(var_x: T.handle, w: T.Buffer((P, K, PANEL), "float32"), var_y: T.handle):
            T.func_attr(attrs)
            M = T.int64()
            x = T.match_buffer(var_x, (M, K), "float32")
            y = T.match_buffer(var_y, (M, N), "float32")
            rc = T.call_extern("int32", "kiln_cpu_sgemm_packed", x.data, w.data, y.data, M, T.int64(N), T.int64(K))
            assert rc == 0, "kiln_cpu_sgemm_packed failed"

        return kiln_sgemm
    assert ep & EP_BIAS, "an epilogue without a bias is not built"
    if not ep & EP_RES:
        @T.prim_func
        def kiln_sgemm_ep(var_x: T.handle, w: T.Buffer((P, K, PANEL), "float32"), bias: T.Buffer((N,), "float32"), var_y: T.handle):
            T.func_attr(attrs)
            M = T.int64()
            x = T.match_buffer(var_x, (M, K), "float32")
            y = T.match_buffer(var_y, (M, N), "float32")
            rc = T.call_extern("int32", "kiln_cpu_sgemm_packed_ep", x.data, w.data, y.data, M, T.int64(N), T.int64(K), bias.data, bias.data,
                               T.int64(ep))
            assert rc == 0, "kiln_cpu_sgemm_packed_ep failed"

        return kiln_sgemm_ep

    @T.prim_func
    def kiln_sgemm_ep_res(var_x: T.handle, w: T.Buffer((P, K, PANEL), "float32"), bias: T.Buffer((N,), "float32"), var_r: T.handle,
                          var_y: T.handle):
        T.func_attr(attrs)
        M = T.int64()
        x = T.match_buffer(var_x, (M, K), "float32")
        r = T.match_buffer(var_r, (M, N), "float32")
        y = T.match_buffer(var_y, (M, N), "float32")
        rc = T.call_extern("int32", "kiln_cpu_sgemm_packed_ep", x.data, w.data, y.data, M, T.int64(N), T.int64(K), bias.data, r.data,
                           T.int64(ep))
        assert rc == 0, "kiln_cpu_sgemm_packed_ep failed"

    return kiln_sgemm_ep_res


def sconv_packed(geom: dict, N: int, ep: int = 0):
    """The call_tir callee of a one-group 2-D convolution on its packed weight (passes/read_conv_patches_in_place.py):
    x [B, H, W, C] (NHWC, B symbolic) -> y [B, OH, OW, N]; `geom` holds H, W, C, OH, OW, KH, KW and the
    strides sh, sw, leading pads ph, pw and dilations dh, dw (and XC, x's channels, where KW is folded
    into C: x [B, H, W, XC], C = KW XC, KW 1). The weight's K runs in (kh, kw, c) order.
    With an epilogue `ep` (as sgemm_packed's) the arguments are (x, w, bias [N], res [B, OH, OW, N] if EP_RES, y)."""
    g = {k: int(v) for k, v in geom.items()}
    H, W, C, OH, OW, KH, KW = (g[k] for k in ("H", "W", "C", "OH", "OW", "KH", "KW"))
    XC = g.get("XC", C)  # x's channels: C, or C / KW with the kernel's width folded into its taps (x padded: no tap leaves it)
    P, K = (N + PANEL - 1) // PANEL, KH * KW * C
    i64 = T.int64
    attrs = {"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8, PACKED_CONV_ATTR: {**g, "N": N, "ep": ep}}

    def call(x, w, y, B, bias, res):
        return T.call_extern("int32", "kiln_cpu_sconv_packed", x, w, y, B, i64(H), i64(W), i64(C), i64(OH), i64(OW), i64(KH), i64(KW),
                             i64(g["sh"]), i64(g["sw"]), i64(g["ph"]), i64(g["pw"]), i64(g["dh"]), i64(g["dw"]), i64(N), bias, res, i64(ep),
                             i64(XC))

    if ep == 0:
        @T.prim_func
        def kiln_sconv(var_x: T.handle, w: T.Buffer((P, K, PANEL), "float32"), var_y: T.handle):
            T.func_attr(attrs)
            B = T.int64()
            x = T.match_buffer(var_x, (B, H, W, XC), "float32")
            y = T.match_buffer(var_y, (B, OH, OW, N), "float32")
            rc = call(x.data, w.data, y.data, B, y.data, y.data)
            assert rc == 0, "kiln_cpu_sconv_packed: out of memory for the row pointers"

        return kiln_sconv
    assert ep & EP_BIAS, "an epilogue without a bias is not built"
    if not ep & EP_RES:
        @T.prim_func
        def kiln_sconv_ep(var_x: T.handle, w: T.Buffer((P, K, PANEL), "float32"), bias: T.Buffer((N,), "float32"), var_y: T.handle):
            T.func_attr(attrs)
            B = T.int64()
            x = T.match_buffer(var_x, (B, H, W, XC), "float32")
            y = T.match_buffer(var_y, (B, OH, OW, N), "float32")
            rc = call(x.data, w.data, y.data, B, bias.data, bias.data)
            assert rc == 0, "kiln_cpu_sconv_packed: out of memory for the row pointers"

        return kiln_sconv_ep

    @T.prim_func
    def kiln_sconv_ep_res(var_x: T.handle, w: T.Buffer((P, K, PANEL), "float32"), bias: T.Buffer((N,), "float32"), var_r: T.handle,
                          var_y: T.handle):
        T.func_attr(attrs)
        B = T.int64()
        x = T.match_buffer(var_x, (B, H, W, XC), "float32")
        r = T.match_buffer(var_r, (B, OH, OW, N), "float32")
        y = T.match_buffer(var_y, (B, OH, OW, N), "float32")
        rc = call(x.data, w.data, y.data, B, bias.data, r.data)
        assert rc == 0, "kiln_cpu_sconv_packed: out of memory for the row pointers"

    return kiln_sconv_ep_res


def sgemm_batched():
    """The call_tir callee for products of two activations (attention's q k^T, p v), every size
    symbolic: a [batch, M, K] @ b [batch or 1, K, N] -> y [batch, M, N]; b is packed into panels
    per call, inside the kernel (a few KB per product)."""

    @T.prim_func
    def kiln_sgemm_batched(var_a: T.handle, var_b: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        batch, bb, M, N, K = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        a = T.match_buffer(var_a, (batch, M, K), "float32")
        b = T.match_buffer(var_b, (bb, K, N), "float32")
        y = T.match_buffer(var_y, (batch, M, N), "float32")
        rc = T.call_extern("int32", "kiln_cpu_sgemm_batched", a.data, b.data, y.data, batch, bb, M, N, K)
        assert rc == 0, "kiln_cpu_sgemm_batched: out of memory for the packed panels"

    return kiln_sgemm_batched


def softmax_rows():
    """The call_tir callee of kernels/cpu/softmax.c: x [R, L] -> y [R, L], softmax of each row
    (R and L symbolic)."""

    @T.prim_func(s_tir=True)
    def kiln_softmax_rows(var_x: T.handle, var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        R, L = T.int64(), T.int64()
        x = T.match_buffer(var_x, (R, L), "float32")
        y = T.match_buffer(var_y, (R, L), "float32")
        # a root block: Relax's RewriteDataflowReshape inspects every call_tir callee whose input and output
        # sizes agree, and asserts that its body is one
        with T.sblock("root"):
            T.reads(x[0:R, 0:L])
            T.writes(y[0:R, 0:L])
            T.evaluate(T.call_extern("int32", "kiln_cpu_softmax_rows", x.data, y.data, R, L))

    return kiln_softmax_rows


def sgemm_q8(K: int, N: int):
    """The call_tir callee of kiln_cpu_sgemm_q8 for one q8 [N, K] matrix, the NT_qmatmul kernel's
    arguments: x [A, S, K] f32, q [N, K] int8, s [N, K / 32] f16 -> y [A, S, N] f32 (A, S symbolic).
    Each task decodes the weight panels it uses to fp32 and runs the float micro-kernel."""

    @T.prim_func
    def kiln_sgemm_q8(var_x: T.handle, q: T.Buffer((N, K), "int8"), s: T.Buffer((N, K // 32), "float16"), var_y: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        A = T.int64()
        S = T.int64()
        x = T.match_buffer(var_x, (A, S, K), "float32")
        y = T.match_buffer(var_y, (A, S, N), "float32")
        rc = T.call_extern("int32", "kiln_cpu_sgemm_q8", x.data, q.data, s.data, y.data, A * S, T.int64(N), T.int64(K))
        assert rc == 0, "kiln_cpu_sgemm_q8: out of memory for a decoded panel slice"

    return kiln_sgemm_q8

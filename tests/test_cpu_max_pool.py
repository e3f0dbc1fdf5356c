"""kiln's NHWC max pool (passes/kernels/cpu/max_pool.c through kernels/pool_cpu.py) against a numpy
twin, built for every x86 level (x86-64-v2 runs the scalar loop, v3 / v4 the AVX2 one) and run where
the host has its flags; MaxPoolOnKernel end to end on ONNX MaxPool nodes against onnxruntime.
Odd geometries on purpose: padding on some sides only, strides, dilation, ceil_mode, channels that
are not a multiple of 8 or 64, a window of one tap, batch 3, outputs enough for the thread split."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.onnx_models import ort_run, rel
from kiln.compiler.cpu_codegen import kernel_objects
from kiln.compiler.onnx_build import compile_onnx
from kiln.compiler.target import parse_target
from kiln.passes.kernels.pool_cpu import max_pool2d_nhwc
from kiln.passes.max_pool_on_kernel import MaxPoolOnKernel
from kiln.runtime import load
from kiln.runtime.hostinfo import host_cpu_flags, host_machine
from kiln.tvm_compat import compiler

t = compiler()
tvm = t.tvm

LEVELS = ["x86-64-v2", "x86-64-v3"]
# B, H, W, C, (KH, KW), (SH, SW), pads (top, left, bottom, right), (DH, DW), ceil_mode
GEOMETRIES = [
    (1, 112, 112, 64, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False),  # ResNet-50's stem pool
    (3, 9, 11, 17, (3, 2), (2, 3), (1, 0, 0, 1), (1, 1), True),
    (2, 10, 7, 72, (2, 3), (1, 2), (0, 1, 1, 0), (2, 1), False),
    (1, 8, 8, 200, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), False),
    (2, 13, 13, 5, (3, 3), (3, 3), (0, 0, 0, 0), (1, 1), True),
    (1, 6, 5, 130, (5, 4), (1, 1), (2, 2, 2, 1), (1, 1), False),
]


def out_size(n, k, s, p0, p1, d, ceil):
    span = n + p0 + p1 - d * (k - 1) - 1
    o = (-(-span // s) if ceil else span // s) + 1
    if ceil and (o - 1) * s >= n + p0:  # the last window must start inside x or its leading pad (ONNX, torch)
        o -= 1
    return o


def max_pool_f64(x, k, s, pads, d, ceil):
    """float64 twin: x [B, H, W, C] NHWC -> [B, OH, OW, C]; taps in the padding skipped."""
    B, H, W, C = x.shape
    oh, ow = out_size(H, k[0], s[0], pads[0], pads[2], d[0], ceil), out_size(W, k[1], s[1], pads[1], pads[3], d[1], ceil)
    y = np.full((B, oh, ow, C), -np.inf)
    for i in range(oh):
        for j in range(ow):
            for a in range(k[0]):
                for b in range(k[1]):
                    h, w = i * s[0] - pads[0] + a * d[0], j * s[1] - pads[1] + b * d[1]
                    if 0 <= h < H and 0 <= w < W:
                        y[:, i, j] = np.maximum(y[:, i, j], x[:, h, w])
    return y


@pytest.fixture(scope="module", params=LEVELS)
def level(request, tmp_path_factory):
    if host_machine() != "x86_64":
        pytest.skip("x86-64 targets")
    tg = parse_target("llvm:" + request.param)[0]
    tmp = tmp_path_factory.mktemp(request.param)
    return tg, set(tg.required_cpu_flags()) <= host_cpu_flags(), tmp, kernel_objects(tg, tmp)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:4])))
def test_max_pool_matches_numpy(level, geom):
    tg, runnable, tmp, objs = level
    B, H, W, C, k, s, pads, d, ceil = geom
    func = max_pool2d_nhwc(k[0], k[1], s[0], s[1], pads[0], pads[1], d[0], d[1])
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tg.tvm_target())
    so = tmp / f"pool_{'_'.join(map(str, geom[:4]))}.so"
    lib.export_library(str(so), addons=list(objs))
    if not runnable:
        pytest.skip(f"host lacks {tg.label}'s CPU flags (built and linked only)")
    x = np.random.default_rng(B * 1009 + C).standard_normal((B, H, W, C)).astype(np.float32)
    ref = max_pool_f64(x, k, s, pads, d, ceil)
    y = tvm.runtime.tensor(np.full(ref.shape, np.nan, np.float32), tvm.cpu())
    tvm.runtime.load_module(str(so))["main"](tvm.runtime.tensor(x, tvm.cpu()), y)
    assert np.array_equal(y.numpy(), ref.astype(np.float32))


def _pool_model(path, C, H, W, **attrs):
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper  # noqa: PLC0415

    # a convolution first: ConvAsGemm's layout change is what puts the pool in NHWC
    w = np.random.default_rng(1).standard_normal((C, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("MaxPool", ["c"], ["y"], **attrs)]
    g = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, H, W])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 2], "strides": [2, 3], "pads": [1, 0, 0, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "strides": [1, 2], "pads": [0, 1, 1, 0], "dilations": [2, 1]},
])
def test_max_pool_on_kernel_matches_onnxruntime(attrs, tmp_path):
    """The pass takes ONNX MaxPool after a convolution (NHWC), the library calls the C kernel, and the
    output is onnxruntime's (to the convolution's rounding), at two batch sizes."""
    path = _pool_model(tmp_path / "pool.onnx", 19, 13, 11, **attrs)
    compile_onnx(path, tmp_path / "pool.kiln")
    lib = (tmp_path / "pool.kiln" / "lib" / "cpu.so").read_bytes().decode("latin-1")
    assert "__tvm_ffi_kiln_max_pool2d_" in lib and "kiln_cpu_max_pool2d_nhwc" in lib
    m = load(tmp_path / "pool.kiln")
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 3, 13, 11)).astype(np.float32)
        got, want = m.run({"x": x})["y"], ort_run(path, {"x": x})["y"]
        assert got.shape == want.shape and rel(got, want) < 1e-6, rel(got, want)  # the convolution's rounding: a wrong tap is ~1


def test_max_pool_on_kernel_before_and_after():
    """An NHWC float32 max pool becomes a call_tir of the kernel (one callee per geometry, shared); NCHW and
    float16 pools keep Relax's op."""
    relax = t.relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([t.tirx.Var("n", "int64"), 9, 11, 17], "float32"))
    z = relax.Var("z", relax.TensorType([1, 17, 9, 11], "float32"))
    h = relax.Var("h", relax.TensorType([1, 9, 11, 17], "float16"))
    pool = lambda v, layout: relax.op.nn.max_pool2d(v, [3, 3], [2, 2], [1, 1, 1, 1], layout=layout)  # noqa: E731
    with bb.function("main", [x, z, h]):
        with bb.dataflow():
            a = bb.emit(pool(x, "NHWC"), name_hint="a")
            b = bb.emit(pool(x, "NHWC"), name_hint="b")
            c = bb.emit(pool(z, "NCHW"), name_hint="c")
            d = bb.emit(pool(h, "NHWC"), name_hint="d")
            out = bb.emit_output(relax.Tuple([a, b, c, d]))
        bb.emit_func_output(out)
    before = bb.get()
    after = MaxPoolOnKernel()(before)
    text = after["main"].script()
    assert text.count("R.nn.max_pool2d") == 2 and text.count("kiln_max_pool2d_3_3_2_2_1_1_1_1") == 2, text
    assert [gv.name_hint for gv in after.functions].count("kiln_max_pool2d_3_3_2_2_1_1_1_1") == 1
    assert str(after["main"].body.blocks[0].bindings[0].var.ty.shape) == str(before["main"].body.blocks[0].bindings[0].var.ty.shape)

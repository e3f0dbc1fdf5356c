"""Before/after IR of the passes the ONNX path adds (HoistShapeBindings,
WrapGatherIndices) and the scalar case of CpuInlineElementwise; end to end, a
Range over a dynamic dimension (what broke FuseOps on BERT) vs onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.onnx_models import ort_run

from kiln.compiler.onnx_build import compile_onnx
from kiln.passes.cpu_rules import CpuInlineElementwise
from kiln.passes.hoist_shape_bindings import HoistShapeBindings
from kiln.passes.wrap_gather_indices import WrapGatherIndices
from kiln.runtime import load
from kiln.tvm_compat import compiler

onnx = pytest.importorskip("onnx")


def _names(mod):
    return [b.var.name for b in mod["main"].body.blocks[0].bindings]


def test_hoist_shape_bindings_moves_match_casts_first():
    t = compiler()
    relax, tirx = t.relax, t.tirx
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1], "int64"))
    y = relax.Var("y", relax.TensorType([8], "float32"))
    n = tirx.Var("n", "int64")
    with bb.function("main", [x, y]):
        with bb.dataflow():
            a = bb.emit(relax.op.add(y, y), name_hint="a")
            s = bb.emit(relax.op.tensor_to_shape(x), name_hint="s")
            bb.match_cast(s, relax.ShapeType([n]), name_hint="m")
            r = bb.emit(relax.op.arange(0, n, 1, "int64"), name_hint="r")
            out = bb.emit_output(relax.Tuple([a, r]))
        bb.emit_func_output(out)
    mod = bb.get()
    assert _names(mod) == ["a", "s", "m", "r", "gv"]
    after = HoistShapeBindings()(mod)
    assert _names(after) == ["s", "m", "a", "r", "gv"]
    t.tvm.ir.assert_structural_equal(HoistShapeBindings()(after), after)  # nothing left to move


def test_wrap_gather_indices():
    t = compiler()
    relax = t.relax
    bb = relax.BlockBuilder()
    table = relax.Var("table", relax.TensorType([4, 3], "float32"))
    ids = relax.Var("ids", relax.TensorType([2], "int64"))
    with bb.function("main", [table, ids]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.take(table, ids, axis=0))
        bb.emit_func_output(out)
    before = bb.get()
    assert 'mode="fast"' in before.script()
    after = WrapGatherIndices()(before)
    assert 'mode="wrap"' in after.script() and 'mode="fast"' not in after.script()


def test_scalar_block_is_left_alone():
    t = compiler()
    a = t.te.placeholder((), "int64", name="a")
    b = t.te.compute((), lambda: a() + 1, name="b")
    scalar = t.te.create_prim_func([a, b])
    target = t.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    assert CpuInlineElementwise().apply(scalar, target) is not None


def test_range_over_a_dynamic_dimension(tmp_path):
    """positions = Range(0, Shape(x)[1], 1) added to x: the shape arithmetic BERT exports."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    c = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "one"], ["n"]),
             helper.make_node("Range", ["zero", "n", "one"], ["pos"]), helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "posf"], ["y"]), helper.make_node("ConstantOfShape", ["empty"], ["z"], value=numpy_helper.from_array(np.array([2.0], np.float32))),
             helper.make_node("Mul", ["y", "z"], ["out"])]
    g = helper.make_graph(nodes, "range", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s"])],
                          [c("zero", 0), c("one", 1), numpy_helper.from_array(np.zeros(0, np.int64), "empty")])
    p = tmp_path / "range.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    compile_onnx(p, tmp_path / "range.kiln")
    m = load(tmp_path / "range.kiln")
    for shape in [(2, 5), (3, 9)]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        assert np.allclose(m.run({"x": x})["out"], ort_run(p, {"x": x})["out"], rtol=1e-6)


def test_cpu_matmul_takes_static_rows():
    """ONNX graphs with pinned shapes have a static m (BERT-base at seq 128: 46 s -> 0.9 s a run)."""
    from kiln.passes.cpu_rules import CpuMatmul  # noqa: PLC0415

    t = compiler()
    te, tvm = t.te, t.tvm
    m, n, k = 10, 24, 40
    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((n, k), "float32", name="w")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="NT_matmul")
    target = t.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    sch = CpuMatmul().apply(te.create_prim_func([x, w, y]), target)
    assert sch is not None
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    out = tvm.runtime.empty((m, n), "float32", tvm.cpu())
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    assert np.allclose(out.numpy(), a.astype(np.float64) @ b.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_spatial_reduction_rule_schedules_a_convolution():
    """CpuSpatialReduction (ONNX graphs only): a conv2d + relu gets parallel, reordered,
    vectorised loops and computes what TVM's default loops do."""
    from kiln.passes.cpu_graph_rules import CpuSpatialReduction  # noqa: PLC0415

    t = compiler()
    te, tvm, topi = t.te, t.tvm, __import__("tvm").topi
    x = te.placeholder((1, 5, 12, 16), "float32", name="x")
    w = te.placeholder((8, 5, 3, 3), "float32", name="w")
    y = topi.nn.relu(topi.nn.conv2d_nchw(x, w, 1, 1, 1))
    func = te.create_prim_func([x, w, y])
    target = t.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    sch = CpuSpatialReduction().apply(func, target)
    assert sch is not None
    script = sch.mod["main"].script()
    assert "T.parallel" in script and "T.unroll" in script
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1, 5, 12, 16)).astype(np.float32), rng.standard_normal((8, 5, 3, 3)).astype(np.float32)
    outs = []
    for f in (sch.mod["main"], func):
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
        out = tvm.runtime.empty((1, 8, 12, 16), "float32", tvm.cpu())
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
        outs.append(out.numpy())
    assert np.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5) and outs[1].max() > 0


@pytest.mark.parametrize("pinned", [True, False])
def test_convolutions_as_gemm_match_onnxruntime(tmp_path, pinned):
    """ConvAsGemm: convolutions of every kind it takes (3x3 padded, strided, dilated with uneven
    padding, 1x1 -- the input its own patch matrix in NHWC --, a strided 1x1, bias + ReLU after) and
    one it leaves (depthwise: groups), chained, pinned and dynamic shapes, against onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(3)
    w = lambda name, *shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "w2"], ["b"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w3"], ["c"], dilations=[2, 2], pads=[2, 1, 2, 3]),
             helper.make_node("Conv", ["c", "w4", "b4"], ["d"]),  # 1x1
             helper.make_node("Conv", ["d", "w5"], ["e"], group=8, pads=[1, 1, 1, 1]),  # depthwise: left as a convolution
             helper.make_node("Conv", ["e", "w6"], ["y"], strides=[2, 2])]  # strided 1x1
    inits = [w("w1", 8, 3, 3, 3), w("b1", 8), w("w2", 12, 8, 3, 3), w("w3", 8, 12, 3, 3), w("w4", 8, 8, 1, 1), w("b4", 8),
             w("w5", 8, 1, 3, 3), w("w6", 5, 8, 1, 1)]
    dims = [1, 3, 20, 18] if pinned else ["n", 3, "h", "w"]
    g = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    p = tmp_path / "convs.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    compile_onnx(p, tmp_path / "convs.kiln")
    blob = next((tmp_path / "convs.kiln" / "lib").glob("*.so")).read_bytes()
    assert blob.count(b"kiln_im2col") >= 3  # the 3x3s and the strided 1x1 (the 1x1 reads its input as it is)
    m = load(tmp_path / "convs.kiln")
    for shape in [(1, 3, 20, 18)] if pinned else [(1, 3, 20, 18), (2, 3, 15, 22)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got, want = m.run({"x": x})["y"], ort_run(p, {"x": x})["y"]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("op", ["softmax", "fast_softmax", "layer_norm"])
def test_rowwise_rule_schedules_row_reductions(op):
    """CpuRowwise (ONNX graphs only): softmax (libm's exp and TOPI's fast one) and layer norm over
    [batch, heads, seq, k] rows get one parallel loop over the rows, and compute what TVM's default
    loops do."""
    from kiln.passes.cpu_graph_rules import CpuRowwise  # noqa: PLC0415

    t = compiler()
    te, tvm, topi = t.te, t.tvm, __import__("tvm").topi
    shape = (2, 3, 5, 16)
    x = te.placeholder(shape, "float32", name="x")
    if op == "layer_norm":
        g, b = te.placeholder((16,), "float32", name="g"), te.placeholder((16,), "float32", name="b")
        args = [x, g, b, topi.nn.layer_norm(x, g, b, axis=[-1], epsilon=1e-5)]
    else:
        args = [x, (topi.nn.softmax if op == "softmax" else topi.nn.fast_softmax)(x, axis=-1)]
    func = te.create_prim_func(args)
    target = t.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    sch = CpuRowwise().apply(func, target)
    assert sch is not None
    assert "T.parallel(30)" in sch.mod["main"].script()  # 2 x 3 x 5 rows
    rng = np.random.default_rng(0)
    ins = [rng.standard_normal([int(d) for d in a.shape]).astype(np.float32) for a in args[:-1]]
    outs = []
    for f in (sch.mod["main"], func):
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
        out = tvm.runtime.empty(shape, "float32", tvm.cpu())
        lib["main"](*[tvm.runtime.tensor(a) for a in ins], out)
        outs.append(out.numpy())
    assert np.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)

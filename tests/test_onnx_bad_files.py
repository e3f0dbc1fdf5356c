"""Hostile and broken .onnx files (THREATS 16, 31, 32): each is refused with one
line naming the file and the tensor, node or op, before any codegen and
without allocating what the file claims."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.onnx_models import gather_model

from kiln.cli import main
from kiln.errors import KilnError, ModelFormatError, UnsupportedModelError
from kiln.frontends.onnx import read_onnx
from kiln.frontends.onnx_graph import import_onnx

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _save(path, nodes, inputs, outputs, inits=(), opset=17, domain_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *domain_opsets])
    path.write_bytes(m.SerializeToString())
    return path


def _x(name="x", shape=(2, 3)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _refused(path, cls, *fragments):
    with pytest.raises(cls) as e:
        import_onnx(read_onnx(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_empty_tiny_and_garbage_files(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    _refused(tmp_path / "empty.onnx", ModelFormatError, "too small")
    (tmp_path / "junk.onnx").write_bytes(os.urandom(4096))
    with pytest.raises(ModelFormatError):
        read_onnx(tmp_path / "junk.onnx")
    (tmp_path / "text.onnx").write_bytes(b"this is not a model at all, just text\n" * 10)
    with pytest.raises(ModelFormatError):
        read_onnx(tmp_path / "text.onnx")


def test_truncated_file(tmp_path):
    full = gather_model(tmp_path / "g.onnx").read_bytes()
    for cut in (len(full) // 2, len(full) - 1):
        (tmp_path / "t.onnx").write_bytes(full[:cut])
        _refused(tmp_path / "t.onnx", ModelFormatError, "truncated")


def test_unknown_operator_names_op_node_and_opset(tmp_path, capsys):
    p = _save(tmp_path / "op.onnx", [helper.make_node("Relu", ["x"], ["r"], name="ok"), helper.make_node("FrobnicateTensor", ["r"], ["y"], name="mystery")],
              [_x()], [_x("y")])
    _refused(p, UnsupportedModelError, "operator FrobnicateTensor", "node 'mystery'", "opset 17")
    assert main(["compile", str(p), "-o", str(tmp_path / "op.kiln"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kiln: error:" in err and "FrobnicateTensor" in err
    assert not (tmp_path / "op.kiln").exists()


def test_operator_of_another_domain(tmp_path):
    p = _save(tmp_path / "ms.onnx", [helper.make_node("FusedMatMul", ["x", "x"], ["y"], name="fm", domain="com.microsoft")],
              [_x()], [_x("y")], domain_opsets=[helper.make_opsetid("com.microsoft", 1)])
    _refused(p, UnsupportedModelError, "com.microsoft.FusedMatMul", "node 'fm'", "default ONNX domain")


def test_opset_out_of_range(tmp_path):
    for opset in (5, 99):
        p = _save(tmp_path / f"o{opset}.onnx", [helper.make_node("Relu", ["x"], ["y"])], [_x()], [_x("y")], opset=opset)
        _refused(p, UnsupportedModelError, f"opset {opset}", "7-23")


def test_undefined_value_and_cycle(tmp_path):
    p = _save(tmp_path / "undef.onnx", [helper.make_node("Relu", ["nowhere"], ["y"], name="r")], [_x()], [_x("y")])
    _refused(p, ModelFormatError, "node 'r' reads 'nowhere'")
    cyc = [helper.make_node("Add", ["x", "b"], ["a"], name="first"), helper.make_node("Relu", ["a"], ["b"], name="second")]
    p = _save(tmp_path / "cycle.onnx", cyc, [_x()], [_x("b")])
    _refused(p, ModelFormatError, "node 'first' reads 'b'")
    p = _save(tmp_path / "twice.onnx", [helper.make_node("Relu", ["x"], ["y"], name="a"), helper.make_node("Relu", ["x"], ["y"], name="b")],
              [_x()], [_x("y")])
    _refused(p, ModelFormatError, "node 'b' writes 'y', which is already defined")


def _raw_tensor(name, dims, nbytes):
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, raw_data=b"\0" * nbytes)
    t.dims.extend(dims)
    return t


def test_initializer_sizes(tmp_path):
    bad = _raw_tensor("w", [2, 3], 20)  # 20 bytes for 24
    p = _save(tmp_path / "short.onnx", [helper.make_node("Add", ["x", "w"], ["y"])], [_x()], [_x("y")], [bad])
    _refused(p, ModelFormatError, "initializer 'w'", "20 bytes", "needs 24")
    huge = _raw_tensor("w", [1 << 20, 1 << 20, 1 << 20], 4)  # 2^60 elements
    p = _save(tmp_path / "huge.onnx", [helper.make_node("Add", ["x", "w"], ["y"])], [_x()], [_x("y")], [huge])
    _refused(p, ModelFormatError, "initializer 'w'", "elements")
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1 << 40, 3])
    p = _save(tmp_path / "dim.onnx", [helper.make_node("Relu", ["x"], ["y"])], [inp], [_x("y")])
    _refused(p, ModelFormatError, "input 'x' has dimension 1099511627776")


def _external_model(tmp_path, location, offset=0, length=None, name="ext.onnx"):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = numpy_helper.from_array(arr, "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    info = {"location": location, "offset": str(offset), **({"length": str(length)} if length is not None else {})}
    for k, v in info.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    return _save(tmp_path / name, [helper.make_node("Add", ["x", "w"], ["y"], name="add")], [_x()], [_x("y")], [t]), arr


def test_external_data_inside_the_folder_is_read(tmp_path):
    p, arr = _external_model(tmp_path, "weights/w.bin", offset=8, length=24)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(b"\xff" * 8 + arr.tobytes())
    m = read_onnx(p)
    assert np.array_equal(m.initializers["w"].load(), arr) and m.initializers["w"].external


def test_external_data_escapes_are_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    d = tmp_path / "model"
    d.mkdir()
    p, _ = _external_model(d, "../secret.bin")
    _refused(p, ModelFormatError, "initializer 'w'", "'..'")
    p, _ = _external_model(d, str(secret))
    _refused(p, ModelFormatError, "initializer 'w'", "absolute path")
    (d / "link.bin").symlink_to(secret)
    p, _ = _external_model(d, "link.bin")
    _refused(p, ModelFormatError, "initializer 'w'", "outside the model's folder")
    (d / "sub").symlink_to(tmp_path)
    p, _ = _external_model(d, "sub/secret.bin")
    _refused(p, ModelFormatError, "outside the model's folder")


def test_external_data_out_of_range(tmp_path):
    p, arr = _external_model(tmp_path, "w.bin", offset=16)
    (tmp_path / "w.bin").write_bytes(arr.tobytes())  # 24 bytes: [16, 40) is past the end
    _refused(p, ModelFormatError, "initializer 'w'", "outside the 24-byte file")
    p, _ = _external_model(tmp_path, "missing.bin")
    _refused(p, ModelFormatError, "initializer 'w'", "cannot read")
    p, _ = _external_model(tmp_path, "w.bin", length=12)
    _refused(p, ModelFormatError, "length 12", "needs 24")


def test_unknown_input_rank_needs_a_pinned_shape(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    p = _save(tmp_path / "rank.onnx", [helper.make_node("Relu", ["x"], ["y"])], [x], [_x("y")])
    with pytest.raises(KilnError, match=r"input 'x' has no declared shape: give it with --input-shape x="):
        import_onnx(read_onnx(p))

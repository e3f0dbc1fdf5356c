"""`kiln compile model.onnx --quant q8` (issue 18): the matmul / Gemm / Conv weights that
kiln's integer-dot kernels take are stored as q8 and run on them; everything else stays
float; the quality gate measures the outputs' error against the float graph and
--max-error refuses a compile (nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.onnx_models import export_bert, ort_run

from kiln.cli import main
from kiln.compiler.onnx_build import compile_onnx
from kiln.errors import CompileError
from kiln.runtime import load

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

Q8_REL_L2 = 2e-2  # q8 weights (per 32) and int8 activations (per 32) vs onnxruntime's fp32


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))


def conv_model(path, seed: int = 0):
    """x [b, 32, h, w] -> Conv 3x3 (32 -> 48, K = 288: q8) -> Relu -> Conv 1x1 (48 -> 20, K = 48:
    not a multiple of 32, stays float) -> GlobalAveragePool -> Flatten -> Gemm (20 -> 64, transB;
    K = 20 stays float) -> Relu -> MatMul (64 -> 64, K = 64: q8): logits [b, 64]."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32))  # noqa: E731
    inits = [w(48, 32, 3, 3), w(20, 48, 1, 1), w(64, 20), w(64, 64)]
    for t, n in zip(inits, ("c1", "c2", "fc", "out")):
        t.name = n
    b1 = numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b1")
    nodes = [helper.make_node("Conv", ["x", "c1", "b1"], ["y1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2"], ["y2"]),
             helper.make_node("GlobalAveragePool", ["y2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["g"], transB=1),
             helper.make_node("Relu", ["g"], ["gr"]),
             helper.make_node("MatMul", ["gr", "out"], ["logits"])]
    g = helper.make_graph(nodes, "convq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32, "h", "w"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 64])], initializer=[*inits, b1])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def convq(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_q8")
    path = conv_model(d / "conv.onnx")
    art = d / "conv-q8.kiln"
    assert main(["compile", str(path), "-o", str(art), "--quant", "q8", "--dump-ir", str(d / "ir"), "--quiet"]) == 0
    return path, art, d / "ir"


def test_conv_gemm_matmul_weights_on_the_integer_dots(convq):
    path, art, ir = convq
    m = json.loads((art / "manifest.json").read_text())
    by = {p["name"]: p for p in m["params"]}
    # the 3x3 convolution (K 288) and the MatMul (K 64) are q8 ...
    assert by["c1.q"]["dtype"] == "int8" and by["c1.q"]["shape"] == [48, 288] and by["c1.s"]["shape"] == [48, 9]
    assert by["c1.q"]["source_shape"] == [48, 32, 3, 3] and by["c1.q"]["quant"] == "q8"
    assert by["out.T.q"]["shape"] == [64, 64]  # a MatMul-only weight: the importer stores it transposed ([N, K], `out.T`)
    # ... while rows the integer-dot kernel does not take (K 48, K 20) stay float (in the C GEMM's panels)
    assert by["c2.p"]["quant"] == "none" and by["fc.p"]["quant"] == "none" and by["c2.p"]["layout"] == "f32p16"
    assert m["quant"]["weights"] == "q8" and m["quant"]["matrices"] == 2
    lowered = "\n".join(p.read_text() for p in ir.rglob("*") if p.is_file())
    assert lowered.count("kiln_qdot_q8g32_48x288") >= 1 and "kiln_qdot_q8g32_64x64" in lowered


@pytest.mark.parametrize("shape", [(1, 32, 9, 11), (3, 32, 6, 6)])
def test_q8_graph_matches_onnxruntime_within_q8_error(convq, shape):
    path, art, _ = convq
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    got = load(art).run({"x": x})["logits"]
    want = ort_run(path, {"x": x})["logits"]
    err = rel_l2(got, want)
    assert 1e-5 < err < Q8_REL_L2, err  # quantized (not the float weights), and close


def test_quality_gate_is_recorded_and_bounds_the_compile(convq, tmp_path):
    path, art, _ = convq
    q = json.loads((art / "manifest.json").read_text())["quant"]["quality"]
    assert q["inputs"].startswith("random") and 0 < q["worst_rel_l2"] < Q8_REL_L2
    assert q["outputs"]["logits"]["rel_l2"] == q["worst_rel_l2"]
    # the same graph, an error bound it cannot meet: CompileError, nothing written
    out = tmp_path / "refused.kiln"
    with pytest.raises(CompileError, match="relative L2 error .* is over --max-error 1e-07"):
        compile_onnx(path, out, quant="q8", max_error=1e-7)
    assert not out.exists() and not list(tmp_path.glob(".refused*"))


def test_quality_inputs_from_a_file(convq, tmp_path):
    path, _, _ = convq
    x = np.random.default_rng(3).standard_normal((2, 32, 5, 7)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    art = tmp_path / "given.kiln"
    compile_onnx(path, art, quant="q8", quality_inputs=tmp_path / "in.npz")
    q = json.loads((art / "manifest.json").read_text())["quant"]["quality"]
    assert q["inputs"] == str(tmp_path / "in.npz") and 0 < q["worst_rel_l2"] < Q8_REL_L2
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float64))
    with pytest.raises(CompileError, match="x is float64, the graph takes float32"):
        compile_onnx(path, tmp_path / "bad.kiln", quant="q8", quality_inputs=tmp_path / "bad.npz")
    np.savez(tmp_path / "none.npz", y=x)
    with pytest.raises(CompileError, match=r"no array for input\(s\) x"):
        compile_onnx(path, tmp_path / "none.kiln", quant="q8", quality_inputs=tmp_path / "none.npz")


def test_bert_embeddings_stay_float(tmp_path):
    path = export_bert(tmp_path / "bert.onnx")
    art = tmp_path / "bert-q8.kiln"
    compile_onnx(path, art, quant="q8")
    m = json.loads((art / "manifest.json").read_text())
    by = {p["name"]: p for p in m["params"]}
    assert by["m.embeddings.word_embeddings.weight"]["quant"] == "none"  # a table read by Gather, not a matmul weight
    assert sum(p["quant"] == "q8" and p["dtype"] == "int8" for p in m["params"]) >= 12  # q, k, v, o, up, down x 2 layers
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 100, (2, 9)).astype(np.int64), "attention_mask": np.ones((2, 9), np.int64)}
    got, want = load(art).run(feeds), ort_run(path, feeds)
    assert 1e-5 < rel_l2(got["last_hidden_state"], want["last_hidden_state"]) < Q8_REL_L2


def test_quant_flag_errors(convq, tmp_path, capsys):
    path, _, _ = convq
    with pytest.raises(CompileError, match="CPU targets"):
        compile_onnx(path, tmp_path / "a.kiln", quant="q8", target="cuda:sm_90")
    with pytest.raises(CompileError, match="--quant 'q3'"):
        compile_onnx(path, tmp_path / "b.kiln", quant="q3")
    with pytest.raises(CompileError, match="go with --quant"):
        compile_onnx(path, tmp_path / "c.kiln", max_error=0.1)
    (tmp_path / "model.gguf").touch()
    assert main(["compile", str(tmp_path / "model.gguf"), "-o", str(tmp_path / "d.kiln"), "--max-error", "0.1"]) != 0
    assert "--max-error and --quality-inputs are for .onnx graphs" in capsys.readouterr().err


def test_inspect_and_bench_a_graph_artifact(convq, capsys):
    _, art, _ = convq
    assert main(["inspect", str(art)]) == 0
    assert "quant    q8: 2 matrices (matmul / Gemm / Conv weights); worst output relative L2 error" in capsys.readouterr().out
    assert main(["bench", str(art), "--dim", "h=8", "--dim", "w=6", "--seconds", "0.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"] == {"x": [1, 32, 8, 6]} and out["runs"] >= 5 and 0 < out["p10_ms"] <= out["median_ms"] <= out["p90_ms"]
    assert main(["bench", str(art), "--dim", "seq=3"]) != 0
    assert "--dim seq: not a symbolic dimension of the inputs (b, h, w)" in capsys.readouterr().err


def test_a_convolution_of_many_rows_keeps_float_weights(convq, tmp_path):
    """A pinned 32 x 32 image: the 3x3 convolution's GEMM has 1024 rows (> QDOT_MAX_ROWS) and
    stays float; the MatMul after the pooling (1 row) is still q8."""
    path, _, _ = convq
    art = tmp_path / "pinned.kiln"
    compile_onnx(path, art, quant="q8", quality_check=False, input_shapes=["x=1,32,32,32"])
    by = {p["name"]: p for p in json.loads((art / "manifest.json").read_text())["params"]}
    assert by["c1.p"]["quant"] == "none" and by["out.T.q"]["quant"] == "q8"

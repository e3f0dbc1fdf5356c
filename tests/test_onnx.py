"""ONNX graphs (issue 18): exported from tiny random torch / transformers models,
compiled for this CPU, run through kiln.runtime.load(...).run and compared
with onnxruntime at two input shapes each; input checks at run time; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.onnx_models import export_bert, export_cnn, gather_model, ort_run

from kiln.cli import main
from kiln.compiler.onnx_build import compile_onnx
from kiln.errors import CompileError, RequestError
from kiln.runtime import GraphModel, load

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

RTOL = 1e-4  # max |kiln - onnxruntime| / max |onnxruntime|, fp32


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_cnn")
    onnx_path = export_cnn(d / "cnn.onnx")
    art = d / "cnn.kiln"
    assert main(["compile", str(onnx_path), "-o", str(art), "--quiet"]) == 0  # through the CLI
    return onnx_path, art


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx_bert")
    onnx_path = export_bert(d / "bert.onnx")
    art = d / "bert.kiln"
    compile_onnx(onnx_path, art)
    return onnx_path, art


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 20, 28)])
def test_cnn_matches_onnxruntime(cnn, shape):
    onnx_path, art = cnn
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    m = load(art)
    assert isinstance(m, GraphModel)
    got = m.run({"image": x})
    want = ort_run(onnx_path, {"image": x})
    assert list(got) == ["probs"] and got["probs"].shape == (shape[0], 10)
    assert rel(got["probs"], want["probs"]) < RTOL


@pytest.mark.parametrize("batch,seq", [(2, 7), (1, 13)])
def test_bert_matches_onnxruntime(bert, batch, seq):
    onnx_path, art = bert
    rng = np.random.default_rng(seq)
    ids = rng.integers(0, 100, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq - 2:] = 0  # padding: the attention mask matters
    feeds = {"input_ids": ids, "attention_mask": mask}
    got, want = load(art).run(feeds), ort_run(onnx_path, feeds)
    assert list(got) == ["last_hidden_state", "pooler_output"]
    for k in got:
        assert got[k].shape == want[k].shape and rel(got[k], want[k]) < RTOL, k


def test_manifest_records_the_graph(bert):
    _, art = bert
    m = json.loads((art / "manifest.json").read_text())
    assert m["kind"] == "graph" and m["model"]["source_format"] == "onnx" and m["model"]["opset"] == 17
    assert m["graph"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                                    {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}]
    assert [o["shape"] for o in m["graph"]["outputs"]] == [["batch", "seq", 32], ["batch", 32]]
    names = [p["name"] for p in m["params"]]
    assert "m.embeddings.word_embeddings.weight" in names and all(p["dtype"] == "float32" for p in m["params"])
    # MatMul weights stored [N, K] (`.T`), then in the C GEMM's panels [N / 16, K, 16] (`.p`, layout f32p16)
    transposed = [p for p in m["params"] if p["name"].endswith(".T.p")]
    assert len(transposed) == 12 and transposed[0]["shape"] in ([2, 32, 16], [4, 32, 16], [2, 64, 16])
    assert all(p["layout"] == "f32p16" and p["source_shape"] == [p["shape"][0] * 16, p["shape"][1]] for p in transposed)
    assert set(m["files"]) == {"lib/cpu.so", "weights.safetensors"}


def test_run_refuses_bad_inputs(bert):
    _, art = bert
    m = load(art)
    ids = np.zeros((2, 5), np.int64)
    cases = [
        ({"input_ids": ids}, "missing attention_mask"),
        ({"input_ids": ids, "attention_mask": ids, "token_type_ids": ids}, "unknown token_type_ids"),
        ({"input_ids": ids.astype(np.int32), "attention_mask": ids}, "input input_ids: dtype int32, the graph takes int64"),
        ({"input_ids": ids[0], "attention_mask": ids}, "input input_ids: rank 1 [5], the graph takes rank 2"),
        ({"input_ids": ids, "attention_mask": np.zeros((3, 5), np.int64)}, "dimension 0 (batch) is 3, but batch is 2 in input input_ids"),
        ({"input_ids": ids.tolist(), "attention_mask": ids}, "expected a numpy array"),
        ({"input_ids": np.zeros((2, 0), np.int64), "attention_mask": np.zeros((2, 0), np.int64)}, "must be in [1,"),
    ]
    for feeds, msg in cases:
        with pytest.raises(RequestError) as e:
            m.run(feeds)
        assert msg in str(e.value) and "\n" not in str(e.value)


def test_pinned_input_shape(cnn, tmp_path, capsys):
    onnx_path, _ = cnn
    art = tmp_path / "pinned.kiln"
    compile_onnx(onnx_path, art, input_shapes=["image=2,3,h,16"])
    m = load(art)
    assert m.inputs[0]["shape"] == [2, 3, "h", 16]
    x = np.random.default_rng(2).standard_normal((2, 3, 24, 16)).astype(np.float32)
    assert rel(m.run({"image": x})["probs"], ort_run(onnx_path, {"image": x})["probs"]) < RTOL
    with pytest.raises(RequestError, match=r"input image: dimension 3 is 20, the graph takes 16"):
        m.run({"image": np.zeros((2, 3, 24, 20), np.float32)})
    for spec, msg in [("image=1,3,8", "3 dimensions given, the model's input has 4"), ("image=1,4,8,8", "dimension 1 is 3 in the model, 4 given"),
                      ("pixels=1,3,8,8", "no input of that name; its inputs: image"), ("image=1,3,-1,8", "neither an integer")]:
        with pytest.raises(CompileError, match=msg):
            compile_onnx(onnx_path, tmp_path / "x.kiln", input_shapes=[spec])


def test_cli_run_and_inspect(cnn, tmp_path, capsys):
    onnx_path, art = cnn
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(art), "--input", f"image={tmp_path / 'x.npy'}", "--outputs", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as z:
        assert rel(z["probs"], ort_run(onnx_path, {"image": x})["probs"]) < RTOL
    np.savez(tmp_path / "in.npz", image=x.astype(np.float64))
    capsys.readouterr()
    assert main(["run", str(art), "--inputs", str(tmp_path / "in.npz")]) == 2
    assert "kiln: error: input image: dtype float64, the graph takes float32" in capsys.readouterr().err
    assert main(["run", str(art), "--prompt", "hi"]) == 2
    assert main(["inspect", str(art)]) == 0
    out = capsys.readouterr().out
    assert "kiln graph artifact" in out and "input    image: float32 [batch, 3, h, w]" in out and "output   probs: float32 [batch, 10]" in out


def test_gather_indices_stay_inside_the_table(tmp_path):
    """An out-of-range index wraps (ONNX's rule for negatives), never reads outside the table."""
    onnx_path = gather_model(tmp_path / "gather.onnx")
    art = tmp_path / "gather.kiln"
    compile_onnx(onnx_path, art)
    m = load(art)
    ids = np.array([0, 3, -1, 2], np.int64)
    assert rel(m.run({"ids": ids})["y"], ort_run(onnx_path, {"ids": ids})["y"]) < RTOL
    y = m.run({"ids": np.array([5, -6, 1 << 40], np.int64)})["y"]
    table = np.arange(4 * 300, dtype=np.float32).reshape(4, 300) / 300
    assert np.allclose(y, 2 * table[[5 % 4, -6 % 4, (1 << 40) % 4]])
    assert [p["name"] for p in json.loads((art / "manifest.json").read_text())["params"]] == ["table"]


@pytest.mark.slow
def test_bert_pinned_shapes_match_onnxruntime(bert, tmp_path):
    """Static shapes take kiln's GEMM with a static row count (CpuMatmul)."""
    onnx_path, _ = bert
    art = tmp_path / "bert-pinned.kiln"
    compile_onnx(onnx_path, art, input_shapes=["input_ids=2,9", "attention_mask=2,9"])
    ids = np.random.default_rng(5).integers(0, 100, (2, 9)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got, want = load(art).run(feeds), ort_run(onnx_path, feeds)
    for k in got:
        assert rel(got[k], want[k]) < RTOL, k


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(__import__("shutil").which("nvcc") is None or __import__("shutil").which("gcc") is None, reason="needs nvcc and gcc")
def test_cuda_cross_compile(cnn, tmp_path):
    """`kiln compile model.onnx --target cuda:sm_90` on a GPU-less machine (dlight's GPU rules)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    onnx_path, _ = cnn
    art = tmp_path / "cnn-sm90.kiln"
    res = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(onnx_path), "-o", str(art), "--target", "cuda:sm_90", "--quiet"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((art / "manifest.json").read_text())
    assert [t["archs"] for t in m["targets"]] == [["sm_90"]] and "lib/cuda.so" in m["files"]


def test_scalar_input(tmp_path):
    """A 0-d input (silero-vad's sample rate is one) stays 0-d on its way to the library."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper  # noqa: PLC0415

    g = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"], name="scale")], "scalar",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]), helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    p = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    compile_onnx(p, tmp_path / "scalar.kiln")
    m = load(tmp_path / "scalar.kiln")
    x = np.arange(5, dtype=np.float32)
    assert np.array_equal(m.run({"x": x, "s": np.array(3.0, np.float32)})["y"], 3 * x)
    with pytest.raises(RequestError, match=r"input s: rank 1 \[1\], the graph takes rank 0"):
        m.run({"x": x, "s": np.array([3.0], np.float32)})


def test_unknown_output_shape_is_one_line_at_compile_time(tmp_path):
    """Add of two inputs with unrelated symbolic dims: TVM cannot derive the output shape; the error says so and what helps."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper  # noqa: PLC0415

    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"], name="add")], "add",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"]), helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])])
    p = tmp_path / "add.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(CompileError) as e:
        compile_onnx(p, tmp_path / "add.kiln")
    assert "output shape" in str(e.value) and "--input-shape" in str(e.value) and "\n" not in str(e.value)
    compile_onnx(p, tmp_path / "add.kiln", input_shapes=["a=4", "b=4"])
    m = load(tmp_path / "add.kiln")
    assert np.array_equal(m.run({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})["y"], 2 * np.ones(4))

    def fail(*args):
        raise ValueError("Check failed: something deep inside\n  more lines\nthe last line")

    m._main = fail  # a check only the library makes: still one line
    with pytest.raises(RequestError, match=r"the graph refused these inputs: ValueError: the last line$"):
        m.run({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})


def test_no_weights_graph_runs_on_random_weights(cnn, tmp_path, capsys):
    """--no-weights: code and param spec only (speed runs where the weights do not travel);
    it runs with random_weights, and refuses to run without them."""
    onnx_path, _ = cnn
    art = tmp_path / "nw.kiln"
    assert main(["compile", str(onnx_path), "-o", str(art), "--no-weights", "--quiet"]) == 0
    capsys.readouterr()
    m = json.loads((art / "manifest.json").read_text())
    assert m["weights_file"] is None and not (art / "weights.safetensors").exists() and m["params"]
    with pytest.raises(Exception, match="compiled with --no-weights"):
        load(art)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    out = load(art, random_weights=True).run({"image": x})["probs"]
    assert out.shape == (2, 10) and np.allclose(out.sum(1), 1, atol=1e-5)  # a softmax over random weights
    assert main(["bench", str(art), "--random-weights", "--dim", "h=16", "--dim", "w=16", "--seconds", "0.1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == {"image": [1, 3, 16, 16]}


def test_float16_for_cuda_targets(bert, tmp_path):
    """--dtype float16 (CUDA): fp16 compute with fp32 accumulation (Relax's ToMixedPrecision), the
    matmul weights stored fp16 (NarrowFloatParams: the per-call casts gone), inputs / outputs as in
    the graph; the embedding tables, read by Gather, stay fp32. CPU targets and bfloat16 are refused."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    onnx_path, _ = bert
    art = tmp_path / "bert16.kiln"
    res = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(onnx_path), "-o", str(art), "--target", "cuda:sm_90",
                          "--dtype", "float16", "--quiet"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((art / "manifest.json").read_text())
    by = {p["name"]: p["dtype"] for p in m["params"]}
    assert by["m.embeddings.word_embeddings.weight"] == "float32" and by["m.pooler.dense.weight"] == "float16"
    assert sum(d == "float16" for d in by.values()) == 13  # 6 projections x 2 layers + the pooler
    assert [i["dtype"] for i in m["graph"]["inputs"]] == ["int64", "int64"] and m["graph"]["outputs"][0]["dtype"] == "float32"
    from safetensors.numpy import load_file  # noqa: PLC0415

    w = load_file(str(art / "weights.safetensors"))
    assert w["m.pooler.dense.weight"].dtype == np.float16
    with pytest.raises(CompileError, match="CUDA targets only"):
        compile_onnx(onnx_path, tmp_path / "cpu16.kiln", dtype="float16")
    with pytest.raises(CompileError, match="float32 .as the graph. or float16"):
        compile_onnx(onnx_path, tmp_path / "bf16.kiln", dtype="bfloat16", target="cuda:sm_90")


def test_decoder_exports_with_a_kv_cache_are_told_to_compile_the_checkpoint(tmp_path):
    """An ONNX decoder exported with its KV cache as inputs (optimum's past_key_values.N.key / .value) compiles
    and runs as the graph it is, and the summary says in one line that compiling the checkpoint is the supported
    path for decoders; a graph without such inputs gets no such line."""
    import onnx
    from onnx import TensorProto, helper

    def model(past: str, path):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        pk = helper.make_tensor_value_info(past, TensorProto.FLOAT, [1, 2, 3, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        pr = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, 2, 3, 4])
        nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", [past], ["present.0.key"])]
        m = helper.make_model(helper.make_graph(nodes, "dec", [x, pk], [y, pr]), opset_imports=[helper.make_opsetid("", 17)])
        onnx.save(m, path)
        return path

    summary = compile_onnx(model("past_key_values.0.key", tmp_path / "dec.onnx"), tmp_path / "dec.kiln")
    assert len(summary.warnings) == 1 and "past_key_values.0.key" in summary.warnings[0], summary.warnings
    assert "compile the checkpoint" in summary.warnings[0] and "kiln serve" in summary.warnings[0], summary.warnings
    kv = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    out = load(tmp_path / "dec.kiln").run({"x": np.array([[-1, 2, -3, 4]], np.float32), "past_key_values.0.key": kv})
    assert np.array_equal(out["present.0.key"], kv) and np.array_equal(out["y"], [[0, 2, 0, 4]])
    assert compile_onnx(model("pasta", tmp_path / "other.onnx"), tmp_path / "other.kiln").warnings == []


def _index_model(op: str, path, data_shape, idx_shape, upd_shape=None, **attrs):
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info("data", TensorProto.FLOAT, data_shape),
           helper.make_tensor_value_info("idx", TensorProto.INT64, idx_shape)]
    if upd_shape is not None:
        ins.append(helper.make_tensor_value_info("upd", TensorProto.FLOAT, upd_shape))
    node = helper.make_node(op, [i.name for i in ins], ["y"], **attrs)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    onnx.save(helper.make_model(helper.make_graph([node], op, ins, [out]), opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("op", ["GatherElements", "GatherND", "ScatterElements", "ScatterND"])
def test_gather_and_scatter_indices_stay_inside_the_tensor(op, tmp_path):
    """Index inputs come from callers: in range (negatives included) the result is onnxruntime's; out of range an
    index wraps modulo its axis (WrapGatherIndices) -- a read or, for the scatters, a write never leaves the tensor."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3, 4, 5)).astype(np.float32)
    if op == "GatherElements":  # axis 1: y[i, j, k] = data[i, idx[i, j, k], k]
        args, feeds = ((3, 4, 5), (3, 2, 5)), {"idx": rng.integers(-4, 4, (3, 2, 5))}
        bad = rng.integers(-40, 40, (3, 2, 5))
        want = lambda ix: np.take_along_axis(data, ix % 4, axis=1)  # noqa: E731
        attrs = {"axis": 1}
    elif op == "GatherND":  # y[n, :] = data[idx[n, 0], idx[n, 1], :]
        args, feeds, attrs = ((3, 4, 5), (6, 2)), {"idx": np.stack([rng.integers(-3, 3, 6), rng.integers(-4, 4, 6)], 1)}, {}
        bad = np.stack([rng.integers(-30, 30, 6), rng.integers(-40, 40, 6)], 1)
        want = lambda ix: data[ix[:, 0] % 3, ix[:, 1] % 4]  # noqa: E731
    elif op == "ScatterElements":  # axis 2, one distinct column per (i, j)
        cols = np.broadcast_to(np.array([0, 3]), (3, 4, 2))
        args, attrs = ((3, 4, 5), (3, 4, 2), (3, 4, 2)), {"axis": 2}
        feeds = {"idx": cols - 5 * (rng.integers(0, 2, cols.shape)), "upd": rng.standard_normal((3, 4, 2)).astype(np.float32)}
        bad = cols + 5 * rng.integers(-9, 9, cols.shape)

        def want(ix):
            out = data.copy()
            np.put_along_axis(out, ix % 5, feeds["upd"], axis=2)
            return out
    else:  # ScatterND: rows idx[n] of the first axis replaced
        args, attrs = ((3, 4, 5), (2, 1), (2, 4, 5)), {}
        feeds = {"idx": np.array([[0], [-1]]), "upd": rng.standard_normal((2, 4, 5)).astype(np.float32)}
        bad = np.array([[30], [-7]])

        def want(ix):
            out = data.copy()
            out[ix[:, 0] % 3] = feeds["upd"]
            return out
    onnx_path = _index_model(op, tmp_path / f"{op}.onnx", *args, **attrs)
    art = tmp_path / f"{op}.kiln"
    compile_onnx(onnx_path, art)
    m = load(art)
    feeds = {"data": data, **feeds}
    feeds["idx"] = np.asarray(feeds["idx"], np.int64)
    got = m.run(feeds)["y"]
    assert rel(got, ort_run(onnx_path, feeds)["y"]) < RTOL and rel(got, want(feeds["idx"])) < RTOL
    feeds["idx"] = np.asarray(bad, np.int64)
    assert rel(m.run(feeds)["y"], want(feeds["idx"])) < RTOL


def test_gather_elements_wraps_by_a_symbolic_axis_length(tmp_path):
    """The axis an index runs along may have a run-time length (batch): the modulo takes it from the data's shape."""
    onnx_path = _index_model("GatherElements", tmp_path / "ge.onnx", ["n", 4], ["n", 3], axis=0)
    art = tmp_path / "ge.kiln"
    compile_onnx(onnx_path, art)
    m = load(art)
    for n in (2, 5):
        data = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
        idx = np.array([[7 * r - 11, r, -1] for r in range(n)], np.int64)
        assert np.array_equal(m.run({"data": data, "idx": idx})["y"], np.take_along_axis(data[:, :3], idx % n, axis=0))

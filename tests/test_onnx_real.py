"""A real ONNX model shipped inside a PyPI wheel, compiled and compared with
onnxruntime: rapidocr-onnxruntime's text-direction classifier (a MobileNetV3
from PaddlePaddle: opset 11, -1 / '?' dims, weights as Constant nodes, shape
arithmetic through Cast/Slice/Concat). Fetched only with KILN_FETCH_MODELS=1."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.onnx_models import RAPIDOCR_CLS, RAPIDOCR_PACKAGE, ort_run, pypi_onnx_model

from kiln.compiler.onnx_build import compile_onnx
from kiln.runtime import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rapidocr_cls(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    p = pypi_onnx_model(RAPIDOCR_PACKAGE, RAPIDOCR_CLS)
    if p is None:
        pytest.skip(f"{RAPIDOCR_PACKAGE}'s classifier is not in the kiln cache: KILN_FETCH_MODELS=1 downloads it")
    art = tmp_path_factory.mktemp("rapidocr") / "cls.kiln"
    compile_onnx(p, art)
    return p, art


@pytest.mark.parametrize("shape", [(1, 3, 48, 192), (3, 3, 48, 100)])
def test_rapidocr_classifier_matches_onnxruntime(rapidocr_cls, shape):
    onnx_path, art = rapidocr_cls
    m = load(art)
    assert m.inputs[0]["shape"][1] == 3 and sum(p["dtype"] == "float32" for p in m.artifact.manifest["params"]) > 20  # Constant-node weights lifted
    x = np.random.default_rng(shape[0]).uniform(-1, 1, shape).astype(np.float32)  # the model's input range (normalised pixels)
    (name,) = [o["name"] for o in m.outputs]
    got, want = m.run({"x": x})[name], ort_run(onnx_path, {"x": x})[name]
    assert got.shape == want.shape == (shape[0], 2)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4

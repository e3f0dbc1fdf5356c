"""ONNX exports of tiny random transformers models beyond BERT (issue 18): a ViT
(dynamic batch and image size: its position table is resized to the patch grid)
and a Whisper encoder (HF's own: dynamic batch, 48 frames; the same modules with
the position table cut to the frame count: dynamic frames too). Each is compiled
for this CPU, run through kiln.runtime.load(...).run and compared with
onnxruntime at two input shapes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.onnx_models import WHISPER_FRAMES, WHISPER_MELS, check, compiled, export_vit, export_whisper_encoder

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return compiled(tmp_path_factory, "vit", export_vit)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return compiled(tmp_path_factory, "whisper", export_whisper_encoder)


@pytest.fixture(scope="module")
def whisper_frames(tmp_path_factory):
    return compiled(tmp_path_factory, "whisper_frames", lambda p: export_whisper_encoder(p, dynamic_frames=True))


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 48, 40)])  # the trained grid 4x4, then a resized 6x5 one
def test_vit_matches_onnxruntime(vit, shape):
    onnx_path, m = vit
    assert m.inputs[0]["shape"] == ["batch", 3, "h", "w"]
    check(onnx_path, m, {"pixel_values": np.random.default_rng(shape[2]).standard_normal(shape).astype(np.float32)})


@pytest.mark.parametrize("batch", [1, 3])
def test_whisper_encoder_matches_onnxruntime(whisper, batch):
    onnx_path, m = whisper
    assert m.inputs[0]["shape"] == ["batch", WHISPER_MELS, WHISPER_FRAMES]
    check(onnx_path, m, {"input_features": np.random.default_rng(batch).standard_normal((batch, WHISPER_MELS, WHISPER_FRAMES)).astype(np.float32)})


@pytest.mark.parametrize("batch,frames", [(1, WHISPER_FRAMES), (3, 29)])  # odd frames: the stride-2 conv rounds up
def test_whisper_encoder_dynamic_frames_matches_onnxruntime(whisper_frames, batch, frames):
    onnx_path, m = whisper_frames
    assert m.inputs[0]["shape"] == ["batch", WHISPER_MELS, "frames"]
    check(onnx_path, m, {"input_features": np.random.default_rng(frames).standard_normal((batch, WHISPER_MELS, frames)).astype(np.float32)})

"""ONNX RNN / GRU / LSTM (issue 18; TVM 0.27's importer has none): kiln's converters
(frontends/onnx_rnn.py: the input projection as a matmul, the recurrence as one TIR kernel
with a loop over the steps) against onnxruntime at 1e-4 relative, at two sequence lengths
each: tiny torch.nn.GRU / LSTM exports (dynamic seq and batch, initial states as inputs)
and single nodes built with onnx.helper for what torch does not emit (GRU with
linear_before_reset=0, sequence_lens, peepholes, layout 1); refusals are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.onnx_models import RTOL, check, compiled, export_torch_rnn, ort_run, rel, rnn_model

from kiln.compiler.onnx_build import compile_onnx
from kiln.errors import UnsupportedModelError
from kiln.runtime import load

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SHAPES = [(5, 2), (12, 3)]  # (seq, batch)


def feeds_for(model, seq: int, batch: int, seed: int = 0) -> dict:
    """Random inputs for a compiled model: the sequence input first, lengths in [1, seq], states."""
    rng = np.random.default_rng(seed + seq)
    out = {}
    for i in model.inputs:
        if i["dtype"] == "int32":
            out[i["name"]] = rng.integers(1, seq + 1, batch).astype(np.int32)
            continue
        dims = {"seq": seq, "batch": batch}
        out[i["name"]] = rng.standard_normal([dims.get(d, d) for d in i["shape"]]).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def torch_gru(tmp_path_factory):
    return compiled(tmp_path_factory, "gru", lambda p: export_torch_rnn(p, "gru"))


@pytest.fixture(scope="module")
def torch_lstm(tmp_path_factory):  # two bidirectional layers: torch exports one LSTM node per layer
    return compiled(tmp_path_factory, "lstm", lambda p: export_torch_rnn(p, "lstm", num_layers=2, bidirectional=True))


HELPER_CASES = {  # what torch does not export, one node each
    "gru_reset_after": dict(op="GRU", linear_before_reset=0),
    "gru_bidirectional_lens": dict(op="GRU", direction="bidirectional", sequence_lens=True, linear_before_reset=0),
    "lstm_peepholes_reverse_lens": dict(op="LSTM", direction="reverse", peepholes=True, sequence_lens=True, initial_c=False),
    "rnn_bidirectional_no_bias_no_state": dict(op="RNN", direction="bidirectional", bias=False, initial_h=False),
}


@pytest.fixture(scope="module")
def helper_models(tmp_path_factory):
    return {name: compiled(tmp_path_factory, name, lambda p, kw=kw: rnn_model(p, **kw)) for name, kw in HELPER_CASES.items()}


@pytest.mark.parametrize("seq,batch", SHAPES)
def test_torch_gru_matches_onnxruntime(torch_gru, seq, batch):
    path, m = torch_gru
    assert m.inputs[0]["shape"] == ["seq", "batch", 5]
    check(path, m, feeds_for(m, seq, batch))


@pytest.mark.parametrize("seq,batch", SHAPES)
def test_torch_lstm_matches_onnxruntime(torch_lstm, seq, batch):
    path, m = torch_lstm
    assert [i["name"] for i in m.inputs] == ["x", "h0", "c0"]
    check(path, m, feeds_for(m, seq, batch))


def test_recurrent_weights_stored_packed(torch_lstm):
    """R params (here 2 x 28 x 7 per layer) are stored in the kernel's layout, [D, blocks, H, 32]
    (the GRU's R, 147 floats, stays a constant and is packed by folded Relax ops)."""
    path, _ = torch_lstm
    params = json.loads((path.with_suffix(".kiln") / "manifest.json").read_text())["params"]
    packed = [p for p in params if p["name"].endswith(".packed")]
    assert len(packed) == 2 and all(p["shape"] == [2, 1, 7, 32] for p in packed)


@pytest.mark.parametrize("seq,batch", SHAPES)
@pytest.mark.parametrize("case", list(HELPER_CASES))
def test_helper_built_matches_onnxruntime(helper_models, case, seq, batch):
    path, m = helper_models[case]
    check(path, m, feeds_for(m, seq, batch))


def test_sequence_lens_outside_the_sequence_are_clamped(helper_models):
    """onnxruntime refuses lengths outside [0, seq]; kiln clamps them (they come from the
    caller and index Y): seq + 3 runs like seq, -2 like 0 (Y and the final state 0)."""
    path, m = helper_models["gru_bidirectional_lens"]
    feeds = feeds_for(m, 6, 2)
    feeds["L"] = np.array([9, -2], np.int32)
    got = m.run(feeds)
    want = ort_run(path, {**feeds, "L": np.array([6, 0], np.int32)})
    for k in got:
        assert rel(got[k], want[k]) < RTOL, k
    assert not got["Y"][:, :, 1].any() and not got["Y_h"][:, 1].any()


def test_layout_1_matches_layout_0(tmp_path):
    """onnxruntime refuses layout 1 (batch first); kiln's answer is compared with
    onnxruntime's on the same weights in layout 0."""
    kw = dict(op="LSTM", direction="bidirectional", peepholes=True, sequence_lens=True)
    p1 = rnn_model(tmp_path / "l1.onnx", layout=1, **kw)
    p0 = rnn_model(tmp_path / "l0.onnx", layout=0, **kw)
    compile_onnx(p1, tmp_path / "l1.kiln")
    m = load(tmp_path / "l1.kiln")
    assert m.inputs[0]["shape"] == ["batch", "seq", 5]
    for seq, batch in SHAPES:
        feeds = feeds_for(m, seq, batch)  # layout 1: [batch, seq, I], states [batch, dirs, hidden]
        got = m.run(feeds)
        want = ort_run(p0, {k: (v.transpose(1, 0, 2) if v.ndim == 3 else v) for k, v in feeds.items()})
        assert rel(got["Y"].transpose(1, 2, 0, 3), want["Y"]) < RTOL
        for k in ("Y_h", "Y_c"):
            assert rel(got[k].transpose(1, 0, 2), want[k]) < RTOL, k


@pytest.mark.parametrize("op,attrs,msg", [
    ("GRU", {"activations": ["Relu", "Tanh"]}, "GRU with activations ['relu', 'tanh']: not supported by kiln's converter (only the defaults"),
    ("LSTM", {"clip": 3.0}, "LSTM with clip: not supported"),
    ("LSTM", {"input_forget": 1}, "LSTM with input_forget=1: not supported"),
    ("RNN", {"activations": ["Sigmoid"]}, "RNN with activations ['sigmoid']"),
])
def test_unsupported_attributes_are_refused(tmp_path, op, attrs, msg):
    path = rnn_model(tmp_path / "bad.onnx", op, **attrs)
    with pytest.raises(UnsupportedModelError) as e:
        compile_onnx(path, tmp_path / "bad.kiln")
    assert msg in str(e.value) and f"node recurrence ({op})" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "bad.kiln").exists()


def test_cuda_targets_are_refused(torch_gru, tmp_path):
    """The recurrence kernel is a CPU loop nest: a cuda build would hold it as host code and no
    GPU kernel, so it is refused in one line before any code is generated (a fresh process: the
    CLI loads TVM's CUDA plugin before TVM)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    path, _ = torch_gru
    res = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(path), "-o", str(tmp_path / "gru-cuda.kiln"), "--target", "cuda:sm_90",
                          "--quiet"], capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    err = res.stderr
    assert "run on CPU targets only; compile with --target llvm" in err and "kiln_gru" in err, err
    assert not (tmp_path / "gru-cuda.kiln").exists()

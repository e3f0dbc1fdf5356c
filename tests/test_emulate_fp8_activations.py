"""The quality gate's stand-in for Hopper's fp8 GEMMs (passes/emulate_fp8_activations.py): e4m3 rows rounded as
cvt.rn.satfinite rounds them (checked against torch's float8_e4m3fn cast), put only where the CUDA kernels quantize
(fp8 projections, K % 128 == 0), and asked for only by compiles whose GPU code does it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kiln.compiler.options import CudaOptions
from kiln.compiler.quality import cpu_variant, fp8_activations
from kiln.compiler.target import CompileTarget
from kiln.frontends.models.layers import OP_ATTR, QFORMAT_ATTR, ROLE_ATTR
from kiln.passes.emulate_fp8_activations import EmulateFp8Activations, e4m3_rows
from kiln.tvm_compat import compiler

t = compiler()
relax, te, tirx = t.relax, t.te, t.tirx


def test_e4m3_rows_round_as_the_gpu_quantizer():
    """Per row: scale = max |x| / 448, x / scale to the nearest e4m3 (ties to even, subnormals kept), times scale --
    bit for bit torch's float8_e4m3fn cast of the same float32 products; a zero row stays zero."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 37, 256)).astype(np.float32)
    x[:, :, ::97] *= 40.0  # outlier channels: the rest of the row lands near and below e4m3's normal range
    x[0, 3] = 0.0
    x[1, 5, :] = rng.standard_normal(256).astype(np.float32) * 1e-3
    x[1, 5, 7] = 3.0  # one large value: most of the row is subnormal after scaling
    xt = te.placeholder(x.shape, "float32", name="x")
    f = t.tvm.compile(te.create_prim_func([xt, e4m3_rows(xt)]), target="llvm")
    out = t.tvm.runtime.tensor(np.zeros_like(x))
    f(t.tvm.runtime.tensor(x), out)
    got = out.numpy()

    m = np.abs(x).max(axis=-1, keepdims=True)
    inv = (np.float32(448.0) / np.where(m > 0, m, np.float32(1.0))).astype(np.float32) * (m > 0)
    q = torch.from_numpy((x * inv).astype(np.float32)).to(torch.float8_e4m3fn).to(torch.float32).numpy()
    want = (q * (m / np.float32(448.0))).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), np.abs(got - want).max()
    assert not got[0, 3].any()
    assert len(np.unique(np.abs(q[1, 5]))) <= 64  # the subnormal-heavy row took e4m3's grid


def _module(k: int, fmt: str):
    """main(x [1, s, k], q, s) = one qmatmul projection of format fmt (a stand-in TE body)."""
    bb = relax.BlockBuilder()
    s = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([1, s, k], "float32"))
    q = relax.Var("q", relax.TensorType([64, k], "uint8"))
    sc = relax.Var("sc", relax.TensorType([64, 1], "float32"))

    def compute(xt, qt, st):
        r = te.reduce_axis((0, k), name="r")
        return te.compute((1, xt.shape[1], 64), lambda b, i, j: te.sum(xt[b, i, r] * qt[j, r].astype("float32") * st[j, 0], axis=r), name="qproj")

    with bb.function("main", [x, q, sc]):
        with bb.dataflow():
            y = bb.emit_output(bb.call_te(compute, x, q, sc, primfunc_name_hint="qproj",
                                          primfunc_attrs={OP_ATTR: "qmatmul", ROLE_ATTR: "projection", QFORMAT_ATTR: fmt}))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize(("k", "fmt", "rounded"), [(256, "fp8", True), (192, "fp8", False), (256, "q8", False)])
def test_only_the_gpu_quantized_projections_are_rounded(k, fmt, rounded):
    """fp8 projections with K in whole 128-code steps (the fp8 GEMMs' condition) get e4m3 inputs; K = 192 (the
    widened-weight path on the GPU) and other formats do not."""
    main = EmulateFp8Activations()(_module(k, fmt))["main"].script()
    assert ("call_tir(fp8_act_rows, (x,)" in main) == rounded, main
    assert ("call_tir(qproj, (fp8_act, q, sc)" in main) == rounded, main


LLVM = CompileTarget("llvm")
SM90 = CompileTarget("cuda", arch="sm_90", archs=("sm_90",))
SM80_90 = CompileTarget("cuda", arch="sm_80", archs=("sm_80", "sm_90"))


@pytest.mark.parametrize(("targets", "quant", "wgmma", "want"), [
    ((SM90,), "fp8", True, True),
    ((LLVM, SM90), "fp8", True, True),
    ((SM90,), "fp8", False, False),     # KILN_CUDA_WGMMA=0: the widened-weight kernels, bf16 activations
    ((SM90,), "fp8", None, False),      # KILN_CUDA_FP8_ACT=0: the same, wgmma kept for the rest
    ((SM80_90,), "fp8", True, False),   # not sm_90 alone: no wgmma kernels
    ((LLVM,), "fp8", True, False),
    ((SM90,), "q4g128", True, False),
])
def test_the_gate_emulates_e4m3_activations_only_where_the_gpu_rounds_them(targets, quant, wgmma, want):
    m = SimpleNamespace(plan=object(), targets=targets, kv_dtype=None, kv_fmt=None)
    opts = SimpleNamespace(quant=quant, cuda=CudaOptions(wgmma=wgmma is not False, fp8_act=wgmma is not None))
    assert fp8_activations(m, opts) is want


def test_the_lossy_cpu_variant_carries_the_emulation():
    from kiln.compiler.build import Model  # noqa: PLC0415

    m = Model(ck=None, config=None, family=None, dtype="bfloat16", max_ctx=64, targets=(SM90,), plan=None,
              kv_dtype=None, kv_fmt=None)
    assert cpu_variant(m, lossy=True, fp8_act=True).emulate_fp8_act
    assert not cpu_variant(m, lossy=True).emulate_fp8_act and not cpu_variant(m, lossy=False).emulate_fp8_act
    assert [tg.kind for tg in cpu_variant(m, lossy=True, fp8_act=True).targets] == ["llvm"]


def test_the_gate_of_an_fp8_compile_for_hopper_measures_the_activation_rounding(tmp_path):
    """The same fp8 checkpoint gated for a CPU target (weights only) and for sm_90 (the CPU variant with e4m3
    projection inputs, what the GPU's fp8 GEMMs compute): the second reports the rounding and a larger KLD. The gate
    builds CPU variants only, so no CUDA code is compiled here."""
    import dataclasses  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from helpers.models import make_tiny_checkpoint  # noqa: PLC0415

    from kiln.compiler.build import CompileOptions, read_model  # noqa: PLC0415
    from kiln.compiler.progress import QUIET  # noqa: PLC0415
    from kiln.compiler.quality import quality_gate  # noqa: PLC0415

    tok = make_tiny_checkpoint(tmp_path / "tok", writer="numpy")  # a character-level tokenizer
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # weights 2.5x the init's: logits far from uniform, so rounding shows in the KLD
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(2.5)
    ck = tmp_path / "ck"
    model.save_pretrained(ck)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, ck / f)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 12)
    opts = CompileOptions(model=ck, output=tmp_path / "o.kiln", target="llvm", quant="fp8", calib_text=text).check()
    m = read_model(opts, QUIET)
    cpu = quality_gate(m, opts, QUIET)
    gpu = quality_gate(dataclasses.replace(m, targets=(SM90,)), opts, QUIET)
    assert cpu["measured_on"] == "cpu, float32 arithmetic"
    assert "rounded to e4m3 per token" in gpu["measured_on"]
    assert gpu["mean_kld"] > cpu["mean_kld"] > 0

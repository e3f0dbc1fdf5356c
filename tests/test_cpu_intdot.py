"""The CPU integer-dot quantized matmuls (passes/kernels/cpu/qdot.c through their TIR wrappers,
kernels/qdot_cpu.py) against a numpy twin of the same arithmetic, and what the pass takes.

The twin quantizes activations the way the kernel must (per 32 values: int8 with
d = amax / 127 for q4 weights, int16 with amax / 32767 for q8), sums the codes exactly in
integers and scales each block in float64: the kernel agrees to float32 rounding. Every CPU
level is built (x86-64-v2 runs the portable C path, v3 / v4 AVX2); each runs where the host
has its flags. Odd sizes on purpose: rows not a multiple of the tiles (N = 13, 37), prompts
of 5 and 37 rows, groups 32, 64 and 128, q4k super-blocks of 64, 128, 192 and 256. The float reference (dequantized weights, float
activations) is checked too, loosely: that is the quality the activation rounding costs.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from kiln.compiler.cpu_codegen import kernel_objects
from kiln.compiler.target import parse_target
from kiln.passes.kernels.qdot_cpu import qdot, qdot_supported
from kiln.passes.quant import WEIGHT_FORMATS
from kiln.passes.quant.codec import unpack_nibbles
from kiln.runtime.hostinfo import host_cpu_flags, host_machine
from kiln.tvm_compat import compiler

t = compiler()
tvm = t.tvm

LEVELS = ["x86-64-v2", "x86-64-v3", "x86-64-v4"]
CASES = [("q8", 1, 13, 576), ("q8", 37, 13, 1536), ("q8", 7, 5, 96), ("q4g32", 1, 37, 576), ("q4g32", 5, 13, 128),
         ("q4g128", 1, 13, 576), ("q4g128", 37, 37, 1536), ("q4g128", 5, 6, 640),
         ("q4k", 1, 13, 576), ("q4k", 37, 37, 1536), ("q4k", 5, 6, 128), ("q4k", 7, 5, 64)]  # fmt: skip


def twin(fmt, parts, x: np.ndarray, K: int) -> np.ndarray:
    """y [M, N] in float64: the kernel's arithmetic with exact integer sums."""
    M = x.shape[0]
    top = 32767 if fmt.name == "q8" else 127
    xb = x.reshape(M, K // 32, 32)
    d = (np.abs(xb).max(axis=2) / np.float32(top)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    qa = np.rint(xb * inv[..., None]).astype(np.float64)
    d = d.astype(np.float64)
    s = parts["s"].astype(np.float64)
    if fmt.name == "q8":
        qw = parts["q"].astype(np.float64).reshape(-1, K // 32, 32)
        return (np.einsum("mbk,nbk->mnb", qa, qw) * d[:, None, :] * s[None]).sum(-1)
    g = fmt.group_for(K)
    codes = unpack_nibbles(parts["q"]).astype(np.float64).reshape(-1, K // 32, 32)
    sb, zb = np.repeat(s, g // 32, axis=1), np.repeat(parts["z"].astype(np.float64), g // 32, axis=1)
    if fmt.name == "q4k":  # 8-bit codes of scale and minimum under fp16 super-block scales
        per = fmt.super_for(K) // 32
        sb = sb * np.repeat(parts["d"].astype(np.float64), per, axis=1)
        zb = zb * np.repeat(parts["m"].astype(np.float64), per, axis=1)
    return (np.einsum("mbk,nbk->mnb", qa, codes) * d[:, None, :] * sb[None]).sum(-1) + ((qa.sum(-1) * d)[:, None, :] * zb[None]).sum(-1)


@pytest.fixture(scope="module", params=LEVELS)
def level(request, tmp_path_factory):
    if host_machine() != "x86_64":
        pytest.skip("x86-64 targets")
    tg = parse_target("llvm:" + request.param)[0]
    runnable = set(tg.required_cpu_flags()) <= host_cpu_flags()
    tmp = tmp_path_factory.mktemp(request.param)
    return tg, runnable, tmp, kernel_objects(tg, tmp)  # compiled once per level


@pytest.mark.parametrize("name,M,N,K", CASES)
def test_qdot_matches_its_integer_twin(level, name, M, N, K):
    tg, runnable, tmp, objs = level
    fmt = WEIGHT_FORMATS[name]
    g = fmt.super_for(K) if name == "q4k" else fmt.group_for(K)  # the kernel's block
    assert qdot_supported(name, K, g)
    rng = np.random.default_rng(zlib.crc32(f"{name}-{M}-{N}-{K}".encode()))  # (hash() of a str changes per process: the data did)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 4.0, (M, 1))).astype(np.float32)
    x[0, 7] = 40.0  # an outlier sets its block's scale
    x[-1, 32:64] = 0.0  # an all-zero block: scale 0, no division by it
    parts = fmt.quantize(w)
    kind = {"q8": "q8", "q4k": "q4k"}.get(name, "q4")
    lib = tvm.compile(tvm.IRModule({"main": qdot(K, N, g, kind).with_attr("global_symbol", "main")}), target=tg.tvm_target())
    so = tmp / f"{name}_{M}_{N}_{K}.so"
    lib.export_library(str(so), addons=list(objs))  # (export_library appends to the list it gets)
    if not runnable:
        pytest.skip(f"host lacks {tg.label}'s CPU flags (built and linked only)")
    f = tvm.runtime.load_module(str(so))["main"]
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(x.reshape(1, M, K), dev)] + [tvm.runtime.tensor(parts[k], dev) for k in fmt.parts((N, K))]
    y = tvm.runtime.tensor(np.full((1, M, N), np.nan, np.float32), dev)
    f(*args, y)
    got = y.numpy().reshape(M, N)
    ref = twin(fmt, parts, x, K)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    # against float activations and the dequantized weights: the activation rounding's cost
    flt = x.astype(np.float64) @ fmt.dequantize(parts, (N, K)).astype(np.float64).T
    err = np.abs(got - flt).max() / np.abs(flt).max()
    # (K = 64: the 40.0 outlier's block is half the row, its other values rounded in steps of 40 / 127: 0.065 measured)
    # q8 (int16 activations): worst 1.27e-4 of the max over 300 random draws of these shapes (the 40.0 outlier's block)
    assert err < (2e-4 if name == "q8" else 3e-2 if K > 64 else 1e-1), err


def test_pass_takes_what_the_kernel_fits():
    assert qdot_supported("q8", 576, 32) and not qdot_supported("q8", 48, 16)
    assert qdot_supported("q4g128", 576, 64) and qdot_supported("q4g32", 64, 32)
    assert not qdot_supported("q4g32", 96, 32)  # rows of whole 64-value chunks only
    assert qdot_supported("q4k", 576, 192) and not qdot_supported("q4k", 320, 160)  # super-blocks of whole chunks
    assert not qdot_supported("fp8", 576, 576)  # no integer dot for e4m3 codes


def test_isa_flags_follow_the_target_not_the_host():
    from kiln.compiler.cpu_codegen import isa_flags  # noqa: PLC0415

    if host_machine() != "x86_64":
        pytest.skip("x86-64 targets")
    assert "-mavx2" not in isa_flags(parse_target("llvm:x86-64-v2")[0])
    assert "-mavx2" in isa_flags(parse_target("llvm:x86-64-v3")[0])
    assert isa_flags(parse_target("llvm:aarch64")[0]) == ["-march=armv8.2-a+dotprod"]

"""CPU schedule rules and attention kernels against float64 numpy twins.

Odd sizes on purpose (k=40, n=24, m=13, 6/2 heads, head_dim 24, 37 keys over
3 pages), random inputs, never zeros. Rules also get structure checks: what
they must produce (parallel + vectorised loops) and what they must refuse.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.passes.kernels.attention_cpu import paged_decode_attention_cpu, ragged_prefill_attention_cpu
from kiln.compiler.target import parse_target
from kiln.passes.cpu_rules import CpuGemv, CpuInlineElementwise, CpuMatmul, reduction_tile, vector_lanes
from kiln.runtime.hostinfo import host_cpu_flags, host_machine
from kiln.tvm_compat import compiler

TOL = {"float32": dict(rtol=2e-5, atol=2e-5), "float16": dict(rtol=2e-3, atol=2e-3)}

t = compiler()
tvm, te = t.tvm, t.te

# 4, 8 and 16 fp32 lanes on every host: each is compiled and checked for structure
# everywhere; it runs where the host has the target's CPU flags (CI runs on
# whatever CPU it gets: an AVX-512 host must not be the first to see 16 lanes).
CPUS = {"x86-64-v2": 4, "x86-64-v3": 8, "x86-64-v4": 16}
RUNNABLE: dict[str, bool] = {}


@pytest.fixture(scope="module", params=list(CPUS))
def target(request):
    if host_machine() != "x86_64":
        pytest.skip("x86-64 targets")
    tg = parse_target("llvm:" + request.param)[0]
    tvm_target = tg.tvm_target()
    assert vector_lanes(tvm_target) == CPUS[request.param]
    RUNNABLE[request.param] = set(tg.required_cpu_flags()) <= host_cpu_flags()
    return tvm_target


def _nt_matmul_func(m, n, k, wdtype="float32", bias=False):
    x = te.placeholder((1, m, k), "float32", name="x")
    w = te.placeholder((n, k), wdtype, name="w")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((1, m, n), lambda b, i, j: te.sum(x[b, i, r] * w[j, r].astype("float32"), axis=r), name="NT_matmul")
    args = [x, w]
    if bias:
        bvec = te.placeholder((n,), "float32", name="bias")
        y = te.compute((1, m, n), lambda b, i, j: y[b, i, j] + bvec[j], name="add")
        args.append(bvec)
    return te.create_prim_func([*args, y])


def _build(func, target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _run(func, target, arrays, out_shape):
    """Compile for the target; run it when this host can, else only check the code is built."""
    mod = _build(func, target)
    if not RUNNABLE[str(target.attrs["mcpu"])]:
        pytest.skip(f"compiled for {target.attrs['mcpu']}; this host lacks its CPU flags to run it")
    dev = tvm.cpu()
    out = tvm.runtime.empty(out_shape, "float32", dev)
    mod["main"](*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


def _schedule(rule, func, target):
    sch = rule.apply(func, target)
    assert sch is not None, f"{type(rule).__name__} did not apply"
    return sch.mod["main"]


@pytest.mark.parametrize(("k", "lanes", "acc", "tile"), [
    (40, 16, 4, (8, 1)), (64, 16, 4, (16, 2)), (576, 16, 4, (16, 4)), (13, 8, 4, (1, 1)), (6, 8, 4, (2, 1)), (1, 8, 4, (0, 0)),
])
def test_reduction_tile_divides_k_at_least_twice(k, lanes, acc, tile):
    assert reduction_tile(k, lanes, acc) == tile


@pytest.mark.parametrize(("n", "k"), [(72, 40), (64, 64), (72, 64), (80, 64), (24, 13), (16, 16)])
@pytest.mark.parametrize("wdtype", ["float32", "float16"])
def test_gemv_matches_numpy(target, wdtype, n, k):
    rng = np.random.default_rng(n * k)
    func = _schedule(CpuGemv(), _nt_matmul_func(1, n, k, wdtype, bias=True), target)
    text = func.script()
    assert "T.parallel" in text
    if k % 2 == 0:
        assert "T.vectorized" in text
    x = rng.standard_normal((1, 1, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(wdtype)
    b = rng.standard_normal(n).astype(np.float32)
    got = _run(func, target, [x, w, b], (1, 1, n))
    ref = x.astype(np.float64)[0] @ w.astype(np.float64).T + b
    np.testing.assert_allclose(got[0], ref, **TOL["float32"])


@pytest.mark.parametrize("acc", [1, 2, 4])
def test_gemv_halving_write_back_matches_numpy(target, acc):
    """CpuGemv(tree=True): the partial sums are added by halving vector adds (an
    experiment measured in benchmarks/NOTES.md), same results."""
    rng = np.random.default_rng(acc)
    n, k = 48, 576
    func = _schedule(CpuGemv(accumulators=acc, tree=True), _nt_matmul_func(1, n, k, bias=True), target)
    x = rng.standard_normal((1, 1, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    got = _run(func, target, [x, w, b], (1, 1, n))
    np.testing.assert_allclose(got[0], x.astype(np.float64)[0] @ w.astype(np.float64).T + b, **TOL["float32"])


def test_gemv_uses_the_targets_vector_registers(target):
    """The widest registers of the target appear in the GEMV's machine code."""
    func = _schedule(CpuGemv(), _nt_matmul_func(1, 64, 256), target)
    asm = _build(func, target).mod.inspect_source("asm")
    reg = {4: "xmm", 8: "ymm", 16: "zmm"}[vector_lanes(target)]
    assert reg in asm


def _batched_matmul_func(n, k, bias=False):
    """decode_batch's projection: one token of each of B sequences, x [B, 1, K], B symbolic."""
    bsz = t.tirx.Var("batch_size", "int64")
    x = te.placeholder((bsz, 1, k), "float32", name="x")
    w = te.placeholder((n, k), "float32", name="w")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((bsz, 1, n), lambda b, i, j: te.sum(x[b, i, r] * w[j, r], axis=r), name="NT_matmul")
    args = [x, w]
    if bias:
        bvec = te.placeholder((n,), "float32", name="bias")
        y = te.compute((bsz, 1, n), lambda b, i, j: y[b, i, j] + bvec[j], name="add")
        args.append(bvec)
    return te.create_prim_func([*args, y])


@pytest.mark.parametrize(("n", "k", "bias"), [(48, 576, True), (24, 40, False), (7, 13, False)])
def test_batched_gemv_rows_are_the_single_row_gemv_bit_for_bit(target, n, k, bias):
    """CpuGemv on [B, 1, K] x [N, K] (decode_batch): each row b is reduced exactly as
    the B = 1 GEMV reduces it, so batching never changes a sequence's numbers."""
    rng = np.random.default_rng(n + k)
    batched = _schedule(CpuGemv(), _batched_matmul_func(n, k, bias), target)
    single = _schedule(CpuGemv(), _nt_matmul_func(1, n, k, bias=bias), target)
    xs = rng.standard_normal((5, 1, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    extra = [rng.standard_normal(n).astype(np.float32)] if bias else []
    got = _run(batched, target, [xs, w, *extra], (5, 1, n))
    for b in range(5):
        one = _run(single, target, [xs[b : b + 1], w, *extra], (1, 1, n))
        np.testing.assert_array_equal(got[b], one[0])
    want = xs.astype(np.float64)[:, 0] @ w.astype(np.float64).T + (extra[0] if bias else 0)
    np.testing.assert_allclose(got[:, 0], want, **TOL["float32"])


def test_gemv_refuses_symbolic_rows(target):
    m = t.tirx.Var("m", "int64")
    assert CpuGemv().apply(_nt_matmul_func(m, 24, 40), target) is None


@pytest.mark.parametrize(("n", "k"), [(24, 40), (72, 64), (96, 13), (7, 40)])
@pytest.mark.parametrize("m", [1, 13, 32])
def test_matmul_symbolic_m_matches_numpy(target, m, n, k):
    rng = np.random.default_rng(m * n + k)
    sym = t.tirx.Var("m", "int64")
    func = _schedule(CpuMatmul(), _nt_matmul_func(sym, n, k, bias=True), target)
    assert "T.parallel" in func.script()
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    got = _run(func, target, [x, w, b], (1, m, n))
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    np.testing.assert_allclose(got, ref, **TOL["float32"])


def test_matmul_refuses_elementwise(target):
    x = te.placeholder((4, 8), "float32", name="x")
    y = te.compute((4, 8), lambda i, j: x[i, j] * 2.0, name="y")
    assert CpuMatmul().apply(te.create_prim_func([x, y]), target) is None


def test_inline_elementwise_removes_intermediates(target):
    x = te.placeholder((1, 1, 72), "float32", name="x")
    w = te.placeholder((72,), "float32", name="w")
    sq = te.compute((1, 1, 72), lambda a, b, i: x[a, b, i] * x[a, b, i], name="sq")
    r = te.reduce_axis((0, 72), name="r")
    ssum = te.compute((1, 1), lambda a, b: te.sum(sq[a, b, r], axis=r), name="ssum")
    y = te.compute((1, 1, 72), lambda a, b, i: x[a, b, i] * te.rsqrt(ssum[a, b] / 72.0 + 1e-5) * w[i], name="y")
    func = te.create_prim_func([x, w, y])
    before = func.script().count("alloc_buffer")
    after_func = _schedule(CpuInlineElementwise(), func, target)
    assert after_func.script().count("alloc_buffer") < before
    rng = np.random.default_rng(1)
    xv = rng.standard_normal((1, 1, 72)).astype(np.float32)
    wv = rng.standard_normal(72).astype(np.float32)
    got = _run(after_func, target, [xv, wv], (1, 1, 72))
    x64 = xv.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean() + 1e-5) * wv
    np.testing.assert_allclose(got, ref, **TOL["float32"])


# --- attention ---------------------------------------------------------------

H_Q, H_KV, D, PAGE = 6, 2, 24, 16


def _runnable(func, target):
    mod = _build(func, target)
    if not RUNNABLE[str(target.attrs["mcpu"])]:
        pytest.skip(f"compiled for {target.attrs['mcpu']}; this host lacks its CPU flags to run it")
    return mod


def _attention_ref(q, k, v, sm_scale, causal_offset=None):
    """q [nq, H, D], k/v [nk, H_KV, D] -> out [nq, H, D], lse2 [nq, H] (base-2), float64."""
    nq, nk = q.shape[0], k.shape[0]
    group = H_Q // H_KV
    out = np.zeros((nq, H_Q, D))
    lse = np.zeros((nq, H_Q))
    for i in range(nq):
        visible = nk if causal_offset is None else min(nk - nq + i + 1, nk)
        for h in range(H_Q):
            s = (k[:visible, h // group] @ q[i, h]) * sm_scale
            mx = s.max()
            p = np.exp(s - mx)
            out[i, h] = p @ v[:visible, h // group] / p.sum()
            lse[i, h] = (mx + math.log(p.sum())) / math.log(2)
    return out, lse


def test_paged_decode_attention_matches_numpy(target):
    rng = np.random.default_rng(7)
    ctx = 37  # 3 pages: 16 + 16 + 5
    npages = (ctx + PAGE - 1) // PAGE
    pages = rng.standard_normal((5, 2, H_KV, PAGE, D)).astype(np.float32)
    order = np.array([3, 0, 4], dtype=np.int32)  # pages out of order, one spare
    k = np.concatenate([pages[p, 0].transpose(1, 0, 2) for p in order])[:ctx]
    v = np.concatenate([pages[p, 1].transpose(1, 0, 2) for p in order])[:ctx]
    q = rng.standard_normal((1, H_Q, D)).astype(np.float32)
    func = paged_decode_attention_cpu(H_KV, H_Q, D, "float32", lanes=vector_lanes(target), page_size=PAGE)
    mod = _runnable(func, target)
    dev = tvm.cpu()
    T = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    out = tvm.runtime.empty((1, H_Q, D), "float32", dev)
    lse = tvm.runtime.empty((1, H_Q), "float32", dev)
    sm = 1 / math.sqrt(D)
    mod["main"](T(q), T(pages), T(np.array([0, npages], np.int32)), T(order), T(np.array([ctx - (npages - 1) * PAGE], np.int32)),
                T(np.zeros(1, np.int32)), T(np.zeros(1, np.int32)), out, lse, 0, 1.0, 10000.0, sm)
    ref_o, ref_lse = _attention_ref(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), sm)
    np.testing.assert_allclose(out.numpy(), ref_o, **TOL["float32"])
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-4, atol=1e-4)


def test_ragged_prefill_attention_causal_matches_numpy(target):
    rng = np.random.default_rng(11)
    nq = 13
    q = rng.standard_normal((nq, H_Q, D)).astype(np.float32)
    k = rng.standard_normal((nq, H_KV, D)).astype(np.float32)
    v = rng.standard_normal((nq, H_KV, D)).astype(np.float32)
    func = ragged_prefill_attention_cpu(H_KV, H_Q, D, "float32", lanes=vector_lanes(target))
    mod = _runnable(func, target)
    dev = tvm.cpu()
    T = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    out = tvm.runtime.empty((nq, H_Q, D), "float32", dev)
    lse = tvm.runtime.empty((nq, H_Q), "float32", dev)
    sm = 1 / math.sqrt(D)
    indptr = np.array([0, nq], np.int32)
    mod["main"](T(q), T(indptr), T(k), T(v), T(indptr), T(np.zeros(nq, np.int32)), T(np.zeros(1, np.int32)), out, lse, 1, 0, 1.0, 10000.0, sm)
    ref_o, ref_lse = _attention_ref(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), sm, causal_offset=0)
    np.testing.assert_allclose(out.numpy(), ref_o, **TOL["float32"])
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vocab", [211, 4096, 12288])
def test_greedy_pick_is_the_first_argmax_with_non_finite_logits_as_infinity(vocab):
    """greedy_pick (decode's on-device argmax; two stages over 256 or 128 chunks where the
    vocabulary divides, one stage otherwise) against numpy on rows full of ties, with a NaN,
    with +inf / -inf: the first index of the maximum, non-finite counted as +inf, and the
    all-finite flag."""
    from kiln.frontends.models.layers import greedy_pick, nn  # noqa: PLC0415
    from kiln.passes.pipeline import PipelineOptions, run_pipeline  # noqa: PLC0415

    class Pick(nn.Module):
        def forward(self, x):
            return greedy_pick(x, vocab)

    mod, _ = Pick().export_tvm(spec={"forward": {"x": t.spec.Tensor([1, 1, vocab], "float32")}})
    tgt = parse_target("llvm")[0].tvm_target()
    with tgt:
        mod = run_pipeline(mod, PipelineOptions(target=tgt))
    vm = t.relax.VirtualMachine(t.relax.build(mod, target=tgt), tvm.cpu())
    rng = np.random.default_rng(vocab)
    for trial in range(5):
        x = rng.integers(-3, 3, vocab).astype(np.float32)  # every value repeats: ties everywhere
        if trial == 1:
            x[vocab // 3] = np.nan
        if trial == 2:
            x[vocab - 1], x[7] = np.inf, -np.inf
        if trial == 3:
            x[:] = 2.0
        best, finite = vm["forward"](tvm.runtime.tensor(x.reshape(1, 1, vocab))).numpy()
        assert best == int(np.argmax(np.where(np.isfinite(x), x, np.inf))) and finite == int(np.isfinite(x).all())

"""CudaProjections matches projections by the attribute a model sets on purpose
(frontends/models/layers.py OP_ATTR / ROLE_ATTR), never by a function's name:
before/after IR of one prefill projection (issue 11, item 5)."""

from __future__ import annotations

import re

import pytest

from kiln.frontends.models.layers import OP_ATTR, QFORMAT_ATTR, ROLE_ATTR
from kiln.passes.cuda_projections import CudaProjections
from kiln.tvm_compat import compiler

t = compiler()
relax, te, tirx = t.relax, t.te, t.tirx
SM90 = {"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "thread_warp_size": 32}


def _prefill_projection(name: str, attrs: dict | None, batch_rows: bool = False, out: str = "bfloat16"):
    """main(x [1, s, 128] bf16, w [256, 128] bf16) = one call_tir of an x @ w^T TE kernel called `name`
    (batch_rows: x [B, 1, 128], one token of each of B sequences, as decode_batch has it; out: the
    result's dtype, float32 for an LM head)."""
    bb = relax.BlockBuilder()
    s = tirx.Var("s", "int64")
    x = relax.Var("x", relax.TensorType([s, 1, 128] if batch_rows else [1, s, 128], "bfloat16"))
    w = relax.Var("w", relax.TensorType([256, 128], "bfloat16"))

    def compute(xt, wt):
        k = te.reduce_axis((0, 128), name="k")
        acc = te.compute((*xt.shape[:2], 256), lambda b, i, j: te.sum(xt[b, i, k].astype("float32") * wt[j, k].astype("float32"), axis=k), name=name)
        return acc if out == "float32" else te.compute(acc.shape, lambda *i: acc(*i).astype(out), name=name + "_cast")

    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(bb.call_te(compute, x, w, primfunc_name_hint=name, primfunc_attrs=attrs))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize(("name", "attrs", "swapped"), [
    ("proj", {OP_ATTR: "matmul", ROLE_ATTR: "projection"}, True),   # any name: the attribute decides
    ("NT_matmul", None, False),                                     # the old name alone no longer matches
    ("NT_matmul", {OP_ATTR: "matmul", ROLE_ATTR: "lm_head"}, False),  # the LM head keeps its own path
])
def test_projection_is_matched_by_attribute_not_name(name, attrs, swapped):
    mod = _prefill_projection(name, attrs)
    with t.Target(SM90):
        out = CudaProjections()(mod)
    main = out["main"].script()
    assert ("call_tir(kiln_gemm_256x128_bfloat16," in main) == swapped, main
    assert (f"call_tir({name}," in main) != swapped, main


@pytest.mark.parametrize(("role", "out", "kernel"), [
    ("projection", "bfloat16", "kiln_gemm_rows_256x128_bfloat16"),
    ("lm_head", "float32", "kiln_gemm_rows_f32_256x128_bfloat16"),  # fp32 logits straight from the accumulator
])
def test_batch_rows_run_on_the_rows_gemm(role, out, kernel):
    """decode_batch's [B, 1, K] projections and LM head (one token of each of B sequences) go
    to kiln_gemm_rows (the weight on the MMA's 16-row side, read once per step), not to the
    prompt GEMM, whose 128 x 256 tiles left an H200 at 239 GB/s for B = 8 (16 blocks for N =
    4096), nor to dlight's LM head schedule (553 GB/s)."""
    mod = _prefill_projection("proj", {OP_ATTR: "matmul", ROLE_ATTR: role}, batch_rows=True, out=out)
    with t.Target(SM90):
        out = CudaProjections()(mod)
    main = out["main"].script()
    assert f"call_tir({kernel}," in main, main
    assert "kiln_gemm_256x128" not in main and "call_tir(proj," not in main, main


def test_prompt_lm_head_runs_on_the_rows_gemm():
    """A prompt's [1, n, K] LM head (the n rows logit_pos picked: one per sequence, or every
    position) is the same contiguous rows as decode_batch's [B, 1, K]: reshaped onto kiln_gemm_rows
    (fp32 logits), not a projection GEMM and not dlight's matmul (0.55 TB/s on the 8B shape)."""
    mod = _prefill_projection("proj", {OP_ATTR: "matmul", ROLE_ATTR: "lm_head"}, out="float32")
    with t.Target(SM90):
        out = CudaProjections()(mod)
    main = out["main"].script()
    assert "call_tir(kiln_gemm_rows_f32_256x128_bfloat16," in main and "call_tir(proj," not in main, main
    assert main.count("R.reshape(") == 2, main


@pytest.mark.parametrize(("n", "k", "ks"), [(4096, 4096, 4), (6144, 4096, 4), (4096, 14336, 4), (28672, 4096, 1), (128256, 4096, 1),
                                            (256, 128, 2), (77, 4160, 1)])
def test_rows_ksplit_fills_the_chip_and_divides_k(n, k, ks):
    """gemm_rows_big's split of K is fixed per matrix (so a token's result never depends
    on B): enough blocks for ~120 SMs at 128 tokens, and whole 64-wide steps per range."""
    from kiln.passes.kernels.gemm_cuda import BIG_BK, rows_ksplit  # noqa: PLC0415

    assert rows_ksplit(n, k) == ks and k % (BIG_BK * ks) == 0


@pytest.mark.parametrize(("fmt", "routed"), [("fp8", True), ("q8", False)])
def test_fp8_batch_rows_run_on_the_rows_gemm(fmt, routed):
    """decode_batch's [B, 1, K] projection over fp8 weights (e4m3 codes [N, K], row scales
    [N, 1]) goes to kiln_gemm_rows_f8; formats without a row kernel keep their path."""
    bb = relax.BlockBuilder()
    s = tirx.Var("s", "int64")
    x = relax.Var("x", relax.TensorType([s, 1, 128], "bfloat16"))
    q = relax.Var("q", relax.TensorType([256, 128], "uint8" if fmt == "fp8" else "int8"))
    sc = relax.Var("sc", relax.TensorType([256, 1], "float32"))

    def compute(xt, qt, st):
        k = te.reduce_axis((0, 128), name="k")
        acc = te.compute((xt.shape[0], 1, 256), lambda b, i, j: te.sum(xt[b, i, k].astype("float32") * qt[j, k].astype("float32") * st[j, 0], axis=k),
                         name="qproj")
        return te.compute(acc.shape, lambda *i: acc(*i).astype("bfloat16"), name="qproj_cast")

    with bb.function("main", [x, q, sc]):
        with bb.dataflow():
            y = bb.emit_output(bb.call_te(compute, x, q, sc, primfunc_name_hint="qproj",
                                          primfunc_attrs={OP_ATTR: "qmatmul", ROLE_ATTR: "projection", QFORMAT_ATTR: fmt}))
        bb.emit_func_output(y)
    with t.Target(SM90):
        out = CudaProjections()(bb.get())
    main = out["main"].script()
    assert ("call_tir(kiln_gemm_rows_f8_bfloat16_256x128_bfloat16," in main) == routed, main
    assert ("call_tir(qproj," in main) != routed, main


@pytest.mark.parametrize(("wgmma", "k", "callee", "smem", "threads"), [
    (False, 128, "kiln::gemm_tn<__nv_bfloat16, false>", "92160", 256),
    (True, 128, "kiln::gemm_ws<__nv_bfloat16, false>", "200128", 288),  # 4 stages of 48 KB, 1 KB to align, mbarriers, 2 tensor maps, 2 KB of scales
    (True, 96, "kiln::gemm_tn<__nv_bfloat16, false>", "92160", 256),    # K not a whole number of wgmma's 64-wide steps
])
def test_prompt_gemm_takes_wgmma_only_for_hopper(wgmma, k, callee, smem, threads):
    """wgmma=True (an artifact built for sm_90 alone: compiler.target.wgmma_ok) puts prompt GEMMs on
    kernels/cuda/gemm_wg.cuh's gemm_ws (Hopper's warpgroup MMA fed by TMA from a producer warp: 660-713
    TFLOP/s against gemm_tn's 165-210 on the H200, benchmarks/NOTES.md), with its larger shared-memory ring,
    one more warp and 256 bytes of tensor-map scratch per block; K % 64 != 0 keeps gemm_tn."""
    from kiln.passes.kernels.gemm_cuda import gemm

    src = gemm(k, 256, "bfloat16", wgmma=wgmma).script()
    assert callee in src and f"({smem},)" in src, src
    assert f'T.thread_binding({threads}, thread="threadIdx.x")' in src, src
    assert ("tm = T.alloc_buffer(" in src) == (threads == 288), src  # gemm_ws: the per-block tensor-map scratch
    if threads == 288:  # persistent above the split-K range: at most one block per SM of an H200, tiles walked in turn
        assert 'T.int64(132)), thread="blockIdx.x")' in src, src


def test_wgmma_only_where_every_arch_is_sm90():
    from kiln.compiler.cuda_codegen import gencode_flags
    from kiln.compiler.target import CompileTarget, wgmma_ok

    assert wgmma_ok(CompileTarget("cuda", arch="sm_90", archs=("sm_90",)))
    assert not wgmma_ok(CompileTarget("cuda", arch="sm_80", archs=("sm_80", "sm_90")))
    assert not wgmma_ok(CompileTarget("cuda", arch="sm_89", archs=("sm_89",)))
    assert not wgmma_ok(CompileTarget("llvm"))
    assert gencode_flags(["sm_90"]) == ["-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_90,code=compute_90"]
    assert gencode_flags(["sm_80", "sm_90"])[:2] == ["-gencode", "arch=compute_80,code=sm_80"]


@pytest.mark.parametrize(("n", "k", "ks"), [(4096, 4096, 8), (6144, 4096, 4), (4096, 14336, 8), (28672, 4096, 1), (128256, 4096, 1),
                                            (256, 128, 2), (77, 4160, 1)])
def test_rows_wg_ksplit_balances_waves_and_divides_k(n, k, ks):
    from kiln.passes.kernels.gemm_cuda import rows_wg_ksplit

    assert rows_wg_ksplit(n, k) == ks and k % (64 * ks) == 0


def test_batch_rows_take_the_wgmma_kernel_above_8_on_hopper():
    from kiln.passes.kernels.gemm_cuda import gemm_rows

    src = gemm_rows(4096, 4096, "bfloat16", residual=True, wgmma=True).script()
    assert "kiln::gemm_rows_ws<__nv_bfloat16, __nv_bfloat16, true>" in src and "gemm_rows_big<" not in src, src
    assert "if B <= T.int64(64):" in src and "kiln::gemm_rows_wg<__nv_bfloat16, __nv_bfloat16, true>" in src, src  # up to 64 rows: cp.async
    assert "kiln::gemm_rows<__nv_bfloat16, __nv_bfloat16, true, 8>" not in src, src  # above 8 rows: wgmma
    src = gemm_rows(4096, 4096, "bfloat16", residual=True).script()
    assert "kiln::gemm_rows_big<__nv_bfloat16, __nv_bfloat16, true>" in src and "gemm_rows_wg" not in src, src


def _norm_swiglu(rows_shape, K: int = 256, F: int = 256):
    """main(x [rows..., K], g [K], h [rows..., 2F]) -> (rms_norm(x, g), silu(h[:F]) * h[F:]) in bf16."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([*rows_shape, K], "bfloat16"))
    g = relax.Var("g", relax.TensorType([K], "bfloat16"))
    h = relax.Var("h", relax.TensorType([*rows_shape, 2 * F], "bfloat16"))
    with bb.function("main", [x, g, h]):
        with bb.dataflow():
            n = bb.emit(relax.op.nn.rms_norm(x, g, axes=[-1], epsilon=1e-5))
            gu = bb.emit(relax.op.split(h, 2, axis=-1))
            act = bb.emit(relax.op.nn.silu(bb.emit(relax.TupleGetItem(gu, 0))))
            y = bb.emit(relax.op.multiply(act, bb.emit(relax.TupleGetItem(gu, 1))))
            out = bb.emit_output(relax.Tuple([n, y]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize(("rows", "swapped"), [("prompt", True), ("batch", True), ("decode", False), ("odd_k", False)])
def test_norm_and_swiglu_rows_run_on_kiln_kernels(rows, swapped):
    """RMSNorm and SwiGLU over symbolic rows (a prompt's [1, s, K], decode_batch's [B, 1, K]) go to
    kernels/cuda/rows.cuh (dlight's schedules: 1.0-1.5 TB/s on the H200); decode's static
    [1, 1, K] and rows that are not whole warp passes (K % 256) keep their own path."""
    s = tirx.Var("s", "int64")
    shape, k = {"prompt": ([1, s], 256), "batch": ([s, 1], 512), "decode": ([1, 1], 256), "odd_k": ([1, s], 192)}[rows]
    with t.Target(SM90):
        out = CudaProjections()(_norm_swiglu(shape, K=k, F=k))
    main = out["main"].script()
    assert ("call_tir(kiln_rmsnorm_rows" in main) == swapped, main
    assert ("call_tir(kiln_silu_mul_rows" in main) == swapped, main
    assert ("R.nn.rms_norm(" in main) != swapped, main


@pytest.mark.parametrize(("code", "group", "scaled", "k"), [("4", 128, False, 4096), ("8", 32, False, 4096), ("f8", 4032, True, 4032)])
def test_long_quantized_prompts_widen_the_weight_then_run_the_bf16_kernel_on_hopper(code, group, scaled, k):
    """Above PROMPT_SPLIT_M rows a quantized prompt GEMM on Hopper widens the weight once (dequant_weight into an
    N x K scratch) and runs the persistent bf16 gemm_ws (e4m3: with the row scales), 1.4-2.7x gemm_wg_q on the
    H200 and bit-equal to it; up to 256 rows gemm_wg_q stays; other targets never see either. (e4m3 weights take
    the fp8 kernels where K is whole 128-code steps: the next test; here K = 4032, 63 steps of 64.)"""
    from kiln.passes.kernels.gemm_cuda import qgemm

    src = qgemm(k, 6144, group, code, "bfloat16", wgmma=True).script()
    assert "if M <= T.int64(256):" in src and f"kiln::gemm_wg_q<__nv_bfloat16, {4 if code == '4' else 8 if code == '8' else 9}, {group}>" in src, src
    assert f"kiln::dequant_weight<__nv_bfloat16, {4 if code == '4' else 8 if code == '8' else 9}, {group}>" in src, src
    assert f"kiln::gemm_ws<__nv_bfloat16, false, {9 if scaled else 0}>" in src and f'wd = T.alloc_buffer((6144, {k}), "bfloat16")' in src, src
    assert "dequant_weight" not in qgemm(k, 6144, group, code, "bfloat16").script()


def test_fp8_prompts_and_batch_rows_run_on_fp8_tensor_cores_on_hopper():
    """e4m3 weights on Hopper: prompts and decode_batch above 64 rows quantize their activation rows to e4m3 (one
    scale per token, quant_rows_e4m3) and run on fp8 wgmma -- the persistent gemm_ws_f8 for long prompts,
    gemm_rows_ws_f8 with its fixed split of K for short ones and for batches (H200: prompts 1.45-3.4x the widened
    weight + bf16 kernel, B = 128 rows 1.3-2.9x gemm_rows_wg_q); no widened weight, no bf16 tiles of codes. Other
    targets keep the 16-bit paths."""
    from kiln.passes.kernels.gemm_cuda import gemm_rows_q, qgemm

    src = qgemm(4096, 6144, 4096, "f8", "bfloat16", wgmma=True).script()
    assert "kiln::quant_rows_e4m3<__nv_bfloat16, 2>" in src and "kiln::gemm_ws_f8<__nv_bfloat16, false>" in src, src
    assert "kiln::gemm_rows_ws_f8<__nv_bfloat16, __nv_bfloat16, false>" in src and "if M <= T.int64(256):" in src, src
    assert "dequant_weight" not in src and "gemm_wg_q" not in src, src
    src = gemm_rows_q(4096, 14336, "bfloat16", "f8", out_dtype="float32", wgmma=True).script()
    assert "kiln::gemm_rows_ws_f8<__nv_bfloat16, float, false>" in src and "if B <= T.int64(64):" not in src, src  # above 8 rows
    assert "gemm_rows_wg_q" not in src, src
    for src in (qgemm(4096, 6144, 4096, "f8", "bfloat16").script(), gemm_rows_q(4096, 4096, "bfloat16", "f8").script(),
                qgemm(4096, 6144, 4096, "f8", "bfloat16", wgmma=True, f8_act=False).script(),  # KILN_CUDA_FP8_ACT=0
                gemm_rows_q(4096, 4096, "bfloat16", "f8", wgmma=True, f8_act=False).script()):
        assert "_f8<" not in src and "quant_rows_e4m3" not in src, src


def test_fp8_activation_scratch_is_allocated_whole():
    """The e4m3 activation codes and their scales are written by one kernel and read by the next through access
    pointers over whole buffers (M x K bytes, M floats), not compacted to their first element (see the dequant
    scratch test)."""
    import tvm

    from kiln.passes.kernels.gemm_cuda import qgemm

    mod = tvm.IRModule({"main": qgemm(256, 512, 256, "f8", "bfloat16", wgmma=True).with_attr("global_symbol", "main")})
    ex = tvm.compile(mod, target=tvm.target.Target(SM90))
    host = ex.mod.inspect_source("ll")
    for name in ("aq", "sa"):  # the allocation's size is the symbolic M x K (or M), not a constant element
        allocs = [ln for ln in host.splitlines() if f"%{name} = tail call ptr" in ln]
        assert allocs and all(re.search(r"\(i32 2, i32 %dev_id, i64 %[\w.]+, ", ln) for ln in allocs), allocs


def test_dequant_scratch_is_allocated_whole():
    """The widened weight's scratch is written and read through access pointers over the whole buffer: passed as
    the address of its first element, TVM compacted it to that one element (2 bytes), and the kernels wrote 235 MB
    past it (an illegal-address fault on the H200)."""
    import tvm

    from kiln.passes.kernels.gemm_cuda import qgemm

    mod = tvm.IRModule({"main": qgemm(256, 512, 128, "4", "bfloat16", wgmma=True).with_attr("global_symbol", "main")})
    ex = tvm.compile(mod, target=tvm.target.Target(SM90))
    host = ex.mod.inspect_source("ll")
    assert f"i64 {512 * 256 * 2}, i32 1, i32 16)" in host, [ln for ln in host.splitlines() if "%wd = " in ln]


def test_quantized_prompt_and_fp8_rows_take_wgmma_on_hopper():
    """Quantized weights on Hopper: a prompt's GEMM decodes the codes into wgmma tiles (gemm_wg_q:
    1.4-1.9x gemm_tn_q on the H200), and fp8 decode_batch above 64 rows runs gemm_rows_wg_q; without
    wgmma nothing of either is in the function (its 193 KB of shared memory would not launch on sm_80/89)."""
    from kiln.passes.kernels.gemm_cuda import gemm_rows_q, qgemm

    assert "kiln::gemm_wg_q<__nv_bfloat16, 4, 128>" in qgemm(4096, 4096, 128, "4", "bfloat16", wgmma=True).script()
    assert "kiln::gemm_tn_q<__nv_bfloat16, 4, 128>" in qgemm(4096, 4096, 128, "4", "bfloat16").script()
    src = gemm_rows_q(4032, 4096, "bfloat16", "f8", wgmma=True).script()  # K not whole 128-code steps: not the fp8 MMA
    assert "kiln::gemm_rows_wg_q<" in src and "if B <= T.int64(64):" in src, src
    src = gemm_rows_q(4096, 4096, "bfloat16", "f8").script()
    assert "gemm_rows_wg_q" not in src and "197632" not in src, src


def test_short_prompts_split_k_on_hopper():
    """A prompt of at most 256 rows leaves the 128 x 256 tiles a sixth of the chip for N = 4096: on
    Hopper it runs decode_batch's split-K kernel (gemm_rows_ws + the ordered reduction) instead;
    large N (one wave of tiles already) and other targets keep the tile kernel alone."""
    from kiln.passes.kernels.gemm_cuda import gemm, gemm_residual

    src = gemm_residual(4096, 4096, "bfloat16", wgmma=True).script()
    assert "if B * S <= T.int64(256):" in src and "kiln::gemm_rows_ws<__nv_bfloat16, __nv_bfloat16, true>" in src, src
    assert "kiln::gemm_ws<__nv_bfloat16, true>" in src, src
    src = gemm(4096, 28672, "bfloat16", wgmma=True).script()
    assert "gemm_rows_ws" not in src and "kiln::gemm_ws<" in src, src
    assert "gemm_rows_ws" not in gemm(4096, 4096, "bfloat16").script()


@pytest.mark.parametrize(("fmt", "kernel", "other_use"), [
    ("q4g128", "kiln_qgemv4mmag128_residual_256x256_bfloat16", False),   # the tensor-core GEMV
    ("q4k", "kiln_qgemv4kg256_residual_256x256_bfloat16", False),
    ("fp8", "kiln_qgemvf8g256_residual_256x256_bfloat16", False),
    ("q4g128", None, True),                                              # y read elsewhere too: the add stays
])
def test_decode_residual_add_fuses_into_the_quantized_gemv(fmt, kernel, other_use):
    """decode's add(r, NT_qmatmul(a [1, 1, K], ...)) (o / down projections on the residual stream)
    becomes one qgemv call with r added in its epilogue: 64 launches fewer per Llama-3-8B step."""
    from kiln.frontends.models.layers import qmatmul_compute  # noqa: PLC0415
    from kiln.passes.quant import WEIGHT_FORMATS  # noqa: PLC0415

    f = WEIGHT_FORMATS[fmt]
    K = N = 256
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 1, K], "bfloat16"))
    r = relax.Var("r", relax.TensorType([1, 1, N], "bfloat16"))
    parts = [relax.Var(sfx, relax.TensorType(list(shape), dt)) for sfx, (shape, dt) in f.parts((N, K)).items()]
    with bb.function("main", [x, r, *parts]):
        with bb.dataflow():
            y = bb.emit(bb.call_te(qmatmul_compute(f, f.group_for(K), N, "o_proj", "bfloat16"), x, *parts, primfunc_name_hint="o_proj",
                                   primfunc_attrs={OP_ATTR: "qmatmul", ROLE_ATTR: "projection", QFORMAT_ATTR: fmt}))
            h = bb.emit(relax.op.add(r, y))
            out = bb.emit_output(relax.op.add(h, y) if other_use else h)
        bb.emit_func_output(out)
    with t.Target(SM90):
        main = CudaProjections()(bb.get())["main"].script()
    if kernel is None:
        assert "_residual" not in main and "R.add(r, " in main, main
    else:
        assert f"call_tir({kernel}, (x, {', '.join(f.parts((N, K)))}, r)" in main, main


def _fp8_prompt(role: str, residual: bool, out: str = "bfloat16"):
    """main(x [1, s, 256], r, e4m3 parts) = one fp8 qmatmul of `role` over x (+ r)."""
    from kiln.frontends.models.layers import qmatmul_compute  # noqa: PLC0415
    from kiln.passes.quant import WEIGHT_FORMATS  # noqa: PLC0415

    f = WEIGHT_FORMATS["fp8"]
    K = N = 256
    bb = relax.BlockBuilder()
    s = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([1, s, K], "bfloat16"))
    r = relax.Var("r", relax.TensorType([1, s, N], "bfloat16"))
    parts = [relax.Var(sfx, relax.TensorType(list(shape), dt)) for sfx, (shape, dt) in f.parts((N, K)).items()]
    with bb.function("main", [x, r, *parts]):
        with bb.dataflow():
            y = bb.emit(bb.call_te(qmatmul_compute(f, f.group_for(K), N, "proj", out), x, *parts, primfunc_name_hint="proj",
                                   primfunc_attrs={OP_ATTR: "qmatmul", ROLE_ATTR: role, QFORMAT_ATTR: "fp8"}))
            out_var = bb.emit_output(bb.emit(relax.op.add(r, y)) if residual else y)
        bb.emit_func_output(out_var)
    return bb.get(), list(f.parts((N, K)))


@pytest.mark.parametrize("wgmma", [True, False])
def test_fp8_prompt_residual_add_fuses_into_the_fp8_gemm_on_hopper(wgmma):
    """A prompt's add(r, NT_qmatmul(a [1, s, K], e4m3 ...)) (o / down on the residual stream) becomes one
    kiln_qgemm_f8_residual call with r added in the fp8 GEMM's epilogue on Hopper (64 adds of 26 us each in an 8B
    fp8 artifact's 2048-token prompt); elsewhere the add stays beside the 16-bit GEMM."""
    mod, parts = _fp8_prompt("projection", residual=True)
    with t.Target(SM90):
        main = CudaProjections(wgmma=wgmma)(mod)["main"].script()
    if wgmma:
        assert f"call_tir(kiln_qgemm_f8_residual_256x256_bfloat16, (x, {', '.join(parts)}, r)" in main, main
        assert "R.add(" not in main, main
    else:
        assert "_residual" not in main and "R.add(r, " in main, main


def test_fp8_prompt_lm_head_runs_on_the_rows_gemm():
    """A prompt's chosen rows [1, n, K] through an e4m3 LM head run as n rows of gemm_rows_q (fp32 logits), not on
    TVM's own schedule (1.67 ms for one row of the 8B shape's 525 MB LM head on the H200)."""
    mod, parts = _fp8_prompt("lm_head", residual=False, out="float32")
    with t.Target(SM90):
        main = CudaProjections(wgmma=True)(mod)["main"].script()
    assert "call_tir(kiln_gemm_rows_f8_float32_256x256_bfloat16, (logit_rows_b, " in main and "call_tir(proj," not in main, main

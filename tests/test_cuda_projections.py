"""CudaProjections matches projections by the attribute a model sets on purpose
(frontends/models/layers.py OP_ATTR / ROLE_ATTR), never by a function's name:
before/after IR of one prefill projection (issue 11, item 5)."""

from __future__ import annotations

import pytest

from kiln.frontends.models.layers import OP_ATTR, ROLE_ATTR
from kiln.passes.cuda_projections import CudaProjections
from kiln.tvm_compat import compiler

t = compiler()
relax, te, tirx = t.relax, t.te, t.tirx


def _prefill_projection(name: str, attrs: dict | None, batch_rows: bool = False):
    """main(x [1, s, 128] bf16, w [256, 128] bf16) = one call_tir of an x @ w^T TE kernel called `name`
    (batch_rows: x [B, 1, 128], one token of each of B sequences, as decode_batch has it)."""
    bb = relax.BlockBuilder()
    s = tirx.Var("s", "int64")
    x = relax.Var("x", relax.TensorType([s, 1, 128] if batch_rows else [1, s, 128], "bfloat16"))
    w = relax.Var("w", relax.TensorType([256, 128], "bfloat16"))

    def compute(xt, wt):
        k = te.reduce_axis((0, 128), name="k")
        acc = te.compute((*xt.shape[:2], 256), lambda b, i, j: te.sum(xt[b, i, k].astype("float32") * wt[j, k].astype("float32"), axis=k), name=name)
        return te.compute(acc.shape, lambda *i: acc(*i).astype("bfloat16"), name=name + "_cast")

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
    with t.Target({"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                   "thread_warp_size": 32}):
        out = CudaProjections()(mod)
    main = out["main"].script()
    assert ("call_tir(kiln_gemm_256x128_bfloat16," in main) == swapped, main
    assert (f"call_tir({name}," in main) != swapped, main


def test_batch_rows_run_on_the_gemm_as_rows():
    """decode_batch's [B, 1, K] projections (one token of each of B sequences) go to the
    tensor-core GEMM as B contiguous rows, like a prompt's [1, s, K]: on the H200 dlight's
    schedule for them ran at ~75 ms per step for B = 2..32 (8B shape, bf16)."""
    mod = _prefill_projection("proj", {OP_ATTR: "matmul", ROLE_ATTR: "projection"}, batch_rows=True)
    with t.Target({"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                   "thread_warp_size": 32}):
        out = CudaProjections()(mod)
    assert "call_tir(kiln_gemm_256x128_bfloat16," in out["main"].script()

"""SortShapeHeapStores: before/after IR on hand-built host shape functions, and
byte-identical libraries from repeated compiles of one model."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import compile_artifact, make_tiny_checkpoint

from kiln.passes.sort_shape_heap_stores import SortShapeHeapStores
from kiln.runtime.manifest import MANIFEST_NAME
from kiln.tvm_compat import compiler

t = compiler()
T = t.T
i64 = T.int64


def run_pass(*funcs):
    mod = t.tvm.IRModule({f"f{i}": f for i, f in enumerate(funcs)})
    out = SortShapeHeapStores()(mod)
    return [out[f"f{i}"] for i in range(len(funcs))]


def assert_same_ir(after, expected):
    """Structural equality, ignoring the function's name."""
    t.tvm.ir.assert_structural_equal(after, expected.with_attr("global_symbol", after.attrs["global_symbol"]))


def test_sorts_independent_stores_by_slot():
    # the stores of a shape_func as TVM 0.27's VMShapeLower emits them (order varies by run)
    @T.prim_func(s_tir=True)
    def before(H: T.Buffer((i64(8),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[i64(5)] = i64(400) * H[i64(0)]
        H[i64(4)] = i64(800) * H[i64(0)]
        H[i64(2)] = i64(288) * H[i64(0)]
        H[i64(7)] = i64(4) * H[i64(1)] * i64(211)
        H[i64(3)] = i64(480) * H[i64(0)]
        H[i64(6)] = T.max(i64(288) * H[i64(1)], H[i64(6)])  # reading its own slot is fine

    @T.prim_func(s_tir=True)
    def expected(H: T.Buffer((i64(8),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[i64(2)] = i64(288) * H[i64(0)]
        H[i64(3)] = i64(480) * H[i64(0)]
        H[i64(4)] = i64(800) * H[i64(0)]
        H[i64(5)] = i64(400) * H[i64(0)]
        H[i64(6)] = T.max(i64(288) * H[i64(1)], H[i64(6)])
        H[i64(7)] = i64(4) * H[i64(1)] * i64(211)

    (after,) = run_pass(before)
    assert_same_ir(after, expected)
    (again,) = run_pass(after)
    assert again.same_as(after), "sorted stores must be left as they are"


def test_sorts_each_run_between_other_statements():
    """A statement that is not a constant-index store ends a run; runs sort separately."""

    @T.prim_func(s_tir=True)
    def before(H: T.Buffer((i64(6),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[i64(3)] = i64(2) * H[i64(0)]
        H[i64(2)] = i64(3) * H[i64(0)]
        T.evaluate(T.call_extern("int32", "trace"))
        H[i64(5)] = i64(5) * H[i64(1)]
        H[i64(4)] = i64(7) * H[i64(1)]

    @T.prim_func(s_tir=True)
    def expected(H: T.Buffer((i64(6),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[i64(2)] = i64(3) * H[i64(0)]
        H[i64(3)] = i64(2) * H[i64(0)]
        T.evaluate(T.call_extern("int32", "trace"))
        H[i64(4)] = i64(7) * H[i64(1)]
        H[i64(5)] = i64(5) * H[i64(1)]

    (after,) = run_pass(before)
    assert_same_ir(after, expected)


def test_leaves_dependent_or_unsafe_runs_alone():
    @T.prim_func(s_tir=True)
    def reads_written_slot(H: T.Buffer((i64(8),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[i64(3)] = i64(480) * H[i64(0)]
        H[i64(2)] = i64(2) * H[i64(3)]  # reads slot 3, written just before: order matters

    @T.prim_func(s_tir=True)
    def writes_slot_twice(H: T.Buffer((i64(8),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[i64(3)] = i64(4) * H[i64(0)]
        H[i64(2)] = i64(5) * H[i64(0)]
        H[i64(3)] = i64(6) * H[i64(0)]

    @T.prim_func(s_tir=True)
    def computed_index(H: T.Buffer((i64(8),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[i64(3)] = i64(4) * H[i64(0)]
        H[i64(2)] = H[H[i64(0)]]  # may read slot 3

    @T.prim_func(s_tir=True)
    def impure_call(H: T.Buffer((i64(8),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[i64(3)] = T.call_extern("int64", "next_id")
        H[i64(2)] = T.call_extern("int64", "next_id")

    @T.prim_func(s_tir=True)
    def not_a_host_func(H: T.Buffer((i64(8),), "int64")):
        H[i64(3)] = i64(4) * H[i64(0)]
        H[i64(2)] = i64(5) * H[i64(0)]

    funcs = [reads_written_slot, writes_slot_twice, computed_index, impure_call, not_a_host_func]
    for before, after in zip(funcs, run_pass(*funcs)):
        assert after.same_as(before), before.script()


@pytest.mark.slow
def test_compiling_three_times_gives_identical_library(tmp_path):
    """VMShapeLower's store order varied from build to build (~1 in 3 libraries differed)."""
    model = make_tiny_checkpoint(tmp_path / "model", writer="numpy")
    hashes = []
    for i in range(3):
        out = compile_artifact(model, tmp_path / f"m{i}.kiln")
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        recorded = manifest["files"]["lib/cpu.so"]["sha256"]
        assert recorded == hashlib.sha256((out / "lib/cpu.so").read_bytes()).hexdigest()
        hashes.append(recorded)
    assert len(set(hashes)) == 1, f"lib/cpu.so differs between compiles: {hashes}"


"""ScheduleTIR's GPU rule list: a dlight rule that fails inside apply() is a rule that does
not fit -- the next one is tried -- instead of the compile's end (rapidocr's MobileNetV3 for
cuda:sm_90 died on dlight's Reduction: "consumers of the cache-write stage that are not
properly inlined")."""

from __future__ import annotations

from kiln.passes.schedule_tir import _Guarded, _rules_for
from kiln.tvm_compat import compiler

t = compiler()
SM90 = {"kind": "cuda", "arch": "sm_90", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024, "thread_warp_size": 32}


class _Raises:
    def apply(self, func, target, tunable):
        raise AssertionError("There are some consumers of the cache-write stage that are not properly inlined.")


def _add_one():
    te = t.te
    x = te.placeholder((64,), "float32", name="x")
    y = te.compute((64,), lambda i: x[i] + 1.0, name="y")
    return te.create_prim_func([x, y]).with_attr("global_symbol", "main")


def test_a_rule_that_raises_is_a_rule_that_does_not_fit():
    target = t.Target(SM90)
    assert _Guarded(_Raises()).apply(_add_one(), target, False) is None
    rules = _rules_for(target)
    assert all(isinstance(r, _Guarded) for r in rules[:-1]) and not isinstance(rules[-1], _Guarded)  # Fallback stays loud
    # the guarded list still schedules what its rules fit
    with target:
        mod = t.dlight.ApplyDefaultSchedule(_Guarded(_Raises()), *rules)(t.tvm.IRModule({"main": _add_one()}))
    assert "blockIdx.x" in mod["main"].script()

"""ScheduleTIR: give every TIR function of the module a schedule for the target.

Rules follow dlight: `apply(func, target) -> Schedule | None`, tried in order,
the first that fits wins; the list ends in dlight's generic rules. Rules match
the loop/buffer structure of a function, never its name.
"""

from __future__ import annotations

from ..tvm_compat import compiler
from .cpu_rules import CpuInlineElementwise, cpu_rules


def _rules_for(target, extra=()) -> list:
    t = compiler()
    dl = t.dlight
    if target.kind.name == "llvm":
        rules = cpu_rules()
        # extra rules go before CpuInlineElementwise, which takes every function it is shown
        at = next((i for i, r in enumerate(rules) if isinstance(r, CpuInlineElementwise)), len(rules))
        return rules[:at] + list(extra) + rules[at:] + [dl.cpu.GEMV(), dl.cpu.Reduction()]
    return [*extra, *map(_Guarded, (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction())), dl.gpu.Fallback()]


class MatmulWithoutTensorCores:
    """dlight's GPU Matmul for fp16 graphs (ONNX --dtype float16): its tensor-core path (taken for
    fp16 operands on sm_70+) segfaulted inside TVM 0.27's Tensorize on ResNet-50's and BERT-base's
    matmuls -- a segfault is not an exception a rule list can step past --, and its SIMT schedule's
    2-element vector loads read misaligned fp16 addresses in BERT-base's attention (compute-sanitizer:
    a 4-byte read at an odd half). So: shown an sm_60 target (no tensor cores) and scalar loads."""

    def __init__(self):
        self.rule = _Guarded(_scalar_loads_matmul(compiler()))
        self.simt: dict = {}  # the sm_60 twin of each target the rule is shown (one per compile)

    def apply(self, func, target, tunable):
        key = str(target)
        if key not in self.simt:
            attrs = {k: target.attrs[k] for k in ("max_shared_memory_per_block", "max_threads_per_block", "thread_warp_size") if k in target.attrs}
            self.simt[key] = compiler().Target({"kind": "cuda", "arch": "sm_60", **attrs})
        return self.rule.apply(func, self.simt[key], tunable)


def _scalar_loads_matmul(t):
    matmul = t.dlight.gpu.Matmul

    class _ScalarLoads(matmul):
        def get_configs(self, target):
            cfg = super().get_configs(target)
            cfg.vector_size = 1
            return cfg

    return _ScalarLoads()


class _Guarded:
    """A dlight GPU rule whose failure inside apply() means "does not fit": the next rule is
    tried. dlight's Reduction asserted on the MobileNetV3 of rapidocr ("consumers of the
    cache-write stage that are not properly inlined") and took the whole compile down;
    Fallback, last, still fails loudly (the function then has no schedule at all)."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - TVM raises many types (AssertionError, TVMError, ScheduleError)
            return None


class ScheduleTIR:
    """Module pass: schedule each not-yet-scheduled PrimFunc with the target's rules."""

    def __init__(self, target, extra_rules=()):
        self.target = target
        self.extra_rules = list(extra_rules)  # after kiln's specific rules, before the catch-alls

    def __call__(self, mod):
        t = compiler()
        dl = t.dlight
        return dl.ApplyDefaultSchedule(*_rules_for(self.target, self.extra_rules))(mod)

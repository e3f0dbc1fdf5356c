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

"""One helper for the passes that rewrite Relax functions with a PyExprMutator (kiln's
projection, expert, convolution, gather and calibration rewrites): the loop over the module's
functions lives here once."""

from __future__ import annotations

from collections.abc import Callable

from ..tvm_compat import compiler


def rewrite_functions(mutator, mod, before: Callable | None = None):
    """`mutator` (a relax PyExprMutator built over `mod`) over every Relax function of `mod`;
    `before(func)` runs first (an analysis the mutator reads) and returning False leaves that
    function as it is. Returns the mutator's module: the rewritten functions and any it added
    (kernels); `mod` itself is not changed."""
    relax = compiler().relax
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and (before is None or before(func) is not False):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()

"""A calibration build's graph: every float projection's input passes through an observer first.

    NT_matmul(x [A, S, K], W = packed_params[i])   =>   NT_matmul(observe(x, i), W)

`observe` is the packed function "kiln.calib.observe" (compiler/calibrate.py registers it in
the compiling process, which runs this build only), called with the activations and the
param's index in packed_params (a shape (i,)); it returns x unchanged, so the call is pure to the graph and
nothing moves around it. Used only for the float32 CPU variant that measures per-input-column
activation energy (sum of x^2 over the calibration text) for the quantizers' `importance`;
never in a shipped artifact.
"""

from __future__ import annotations

from ..frontends.models.layers import OP_ATTR, ROLE_ATTR
from ..tvm_compat import compiler
from .cuda_projections import _Analysis, rewrite_functions
from .relax_mutation import call_tir_attrs

_t = compiler()
relax = _t.relax

OBSERVER = "kiln.calib.observe"


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod_ = mod
        self.an: _Analysis | None = None

    def _param_index(self, w) -> int | None:
        """The packed_params index W is read from (a float projection's weight), else None."""
        v = self.an.bound(w) if self.an is not None else None
        if isinstance(v, relax.TupleGetItem) and isinstance(v.tuple_value, relax.Var) and v.tuple_value.name == "packed_params":
            return int(v.index)
        return None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        attrs = call_tir_attrs(self.mod_, call)
        if not attrs:
            return call
        args = list(call.args[1].fields)
        if str(attrs.get(OP_ATTR, "")) != "matmul" or str(attrs.get(ROLE_ATTR, "")) != "projection" or len(args) != 2:
            return call
        idx = self._param_index(args[1])
        if idx is None:
            return call
        seen = relax.call_pure_packed(OBSERVER, args[0], relax.ShapeExpr([idx]), ty_args=[args[0].ty])
        return relax.call_tir(call.args[0], [seen, args[1]], call.ty)

    def run(self):
        return rewrite_functions(self)


@_t.tvm.transform.module_pass(opt_level=0, name="kiln.ObserveProjectionInputs")
class ObserveProjectionInputs:
    """See the module docstring. Calibration builds only (PipelineOptions.observe)."""

    def transform_module(self, mod, _ctx):
        return _Rewriter(mod).run()


__all__ = ["OBSERVER", "ObserveProjectionInputs"]
